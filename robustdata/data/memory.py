"""Shards -> uint8 tensors, for training in memory when a set fits (MNIST, CIFAR).

Images stay uint8 (N, C, H, W): 4x smaller than float and converted per batch.
Every image's sha256 is checked against the manifest while decoding. Decoding
(tar parsing + PNG) runs at about 6k images/s on 2 cores, so the decoded array
is cached under $ROBUSTDATA_CACHE/decoded, keyed by the hashes of the dataset's
shards and manifest: later loads of the same bytes take a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from robustdata.data.manifest import Dataset, first_origins, open_dataset, read_manifest
from robustdata.data.shards import decode_image, decode_label, iter_shard_records
from robustdata.errors import DataError, IntegrityError
from robustdata.progress import progress_bar
from robustdata.io import atomic_file, dumps_json, read_json, sha256_bytes, sha256_file, write_json_atomic


@dataclass
class InMemoryDataset:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    keys: list[str]
    classes: list[str]
    origins: list[str] | None = None  # each sample's first origin (manifest.first_origins); None: its key

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def first_origins(self) -> list[str]:
        return self.keys if self.origins is None else self.origins

    def to(self, device: torch.device | str) -> "InMemoryDataset":
        return InMemoryDataset(self.images.to(device), self.labels.to(device), self.keys, self.classes, self.origins)

    def batches(self, batch_size: int, generator: torch.Generator | None = None,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(float images in [0, 1], labels) batches; shuffled when a generator is given."""
        n = len(self)
        order = (torch.randperm(n, generator=generator, device=generator.device).to(self.images.device)
                 if generator is not None else torch.arange(n, device=self.images.device))
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            index = order[start:start + batch_size]
            yield self.images[index].float().div_(255.0), self.labels[index]


@dataclass
class SampleIndex:
    """What a dataset's manifest says of its samples, without their images: for audits that stream."""

    keys: list[str]
    labels: torch.Tensor  # (N,) int64
    classes: list[str]
    origins: list[str]    # each sample's first origin (manifest.first_origins)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def first_origins(self) -> list[str]:
        return self.origins


def sample_index(dataset: Dataset) -> SampleIndex:
    """The index of an opened dataset, read from its manifest."""
    manifest = read_manifest(dataset.manifest_path)
    labels = torch.tensor(manifest.column("label").to_pylist(), dtype=torch.int64)
    return SampleIndex(manifest.column("key").to_pylist(), labels, dataset.classes, first_origins(manifest))


def load_in_memory(root: str | Path | Dataset, *, verify: bool = True, progress: bool = True,
                   cache_dir: Path | None = None, use_cache: bool = True) -> InMemoryDataset:
    """Decode a whole dataset into tensors; refuse it if any hash disagrees.

    The shard and manifest files are checked against the card first (when
    `verify`), so a cached decode keyed by those hashes is the same data.
    """
    dataset = root if isinstance(root, Dataset) else open_dataset(root, verify=verify)
    shape = dataset.card.get("image_shape")
    if shape is None:
        raise DataError("images differ in shape; use the streaming reader or ingest with a resize",
                        path=dataset.root)
    manifest = read_manifest(dataset.manifest_path)
    keys = manifest.column("key").to_pylist()
    labels = manifest.column("label").to_pylist()
    check_rows(dataset, keys, labels)
    cache = decoded_cache_path(dataset, cache_dir) if use_cache and verify else None
    images = read_decoded(cache, len(keys), shape) if cache else None
    if images is None:
        images = decode_all(dataset, keys, labels, manifest.column("sha256").to_pylist(), verify, progress)
        if cache:
            write_decoded(cache, images)
    return InMemoryDataset(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                           torch.tensor(labels, dtype=torch.int64), keys, dataset.classes, first_origins(manifest))


def check_rows(dataset: Dataset, keys: list[str], labels: list[int]) -> None:
    """The manifest lists the card's number of samples, each labelled with one of its classes."""
    if len(keys) != dataset.card["num_samples"]:
        raise DataError(f"manifest lists {len(keys)} samples, card.json says {dataset.card['num_samples']}",
                        path=dataset.manifest_path)
    num_classes = len(dataset.classes)
    for key, label in zip(keys, labels):
        if not 0 <= label < num_classes:
            raise DataError(f"label {label} is not one of the card's {num_classes} classes",
                            path=dataset.manifest_path, key=key)


def decode_all(dataset: Dataset, keys: list[str], labels: list[int], expected: list[str], verify: bool,
               progress: bool) -> np.ndarray:
    """(N, H, W, C) uint8 from the shards, checked against the manifest row by row."""
    height, width, channels = dataset.card["image_shape"]
    try:
        images = np.empty((len(keys), height, width, channels), dtype=np.uint8)
    except MemoryError as exc:
        raise DataError(f"{len(keys)} images of {dataset.card['image_shape']} do not fit in memory: use the "
                        "streaming reader", path=dataset.root) from exc
    mode = "L" if channels == 1 else "RGB"
    index = 0
    with progress_bar(total=len(keys), unit="img", desc=f"decode {dataset.root.name}", disable=not progress) as bar:
        for path in dataset.shards:
            for record in iter_shard_records(path):
                key, png = record["__key__"], record.get("png")
                if index >= len(keys) or key != keys[index]:
                    raise IntegrityError("shards and manifest disagree on the samples or their order",
                                         path=path, key=key)
                if png is None:
                    raise DataError("sample has no png member", path=path, key=key)
                if verify and sha256_bytes(png) != expected[index]:
                    raise IntegrityError("image bytes do not match the manifest's sha256", path=path, key=key)
                if decode_label(record["cls"], str(path), key) != labels[index]:
                    raise IntegrityError("cls member disagrees with the manifest's label", path=path, key=key)
                image = decode_image(png, path=path, key=key, mode=mode)
                if image.shape != images.shape[1:]:
                    raise DataError(f"image shape {image.shape} differs from the card's "
                                    f"{dataset.card['image_shape']}", path=path, key=key)
                images[index] = image
                index += 1
                bar.update()
    if index != len(keys):
        raise DataError(f"shards hold {index} samples, the manifest lists {len(keys)}", path=dataset.root)
    return images


# --------------------------------------------------------------------------- decoded cache


def decoded_cache_path(dataset: Dataset, cache_dir: Path | None) -> Path:
    from robustdata.data.sources import default_cache_dir

    identity = dumps_json({"shards": dataset.card["shards"], "manifest": dataset.card["manifest"]["sha256"]})
    return Path(cache_dir or default_cache_dir()) / "decoded" / f"{sha256_bytes(identity.encode())[:32]}.npy"


def read_decoded(path: Path, count: int, shape: list[int]) -> np.ndarray | None:
    """The cached array if present, intact and of the right shape; else None (decode again)."""
    sidecar = path.with_suffix(".json")
    if not (path.exists() and sidecar.exists()):
        return None
    if read_json(sidecar).get("sha256") != sha256_file(path):
        return None
    images = np.load(path, allow_pickle=False)
    return images if images.shape == (count, *shape) and images.dtype == np.uint8 else None


def write_decoded(path: Path, images: np.ndarray) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, images, allow_pickle=False)
        digest = sha256_file(tmp)
    write_json_atomic(path.with_suffix(".json"), {"sha256": digest, "shape": list(images.shape)})

"""Shards -> uint8 tensors, for training in memory when a set fits (MNIST, CIFAR).

Images stay uint8 (N, C, H, W): 4x smaller than float and converted per batch.
Every image's sha256 is checked against the manifest while loading.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from robustdata.data.manifest import Dataset, open_dataset, read_manifest
from robustdata.data.shards import decode_image, decode_label, iter_shard_records
from robustdata.errors import DataError, IntegrityError
from robustdata.io import sha256_bytes


@dataclass
class InMemoryDataset:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    keys: list[str]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> "InMemoryDataset":
        return InMemoryDataset(self.images.to(device), self.labels.to(device), self.keys, self.classes)

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


def load_in_memory(root: str | Path | Dataset, *, verify: bool = True,
                   progress: bool = True) -> InMemoryDataset:
    """Decode a whole dataset into tensors; refuse it if any hash disagrees."""
    dataset = root if isinstance(root, Dataset) else open_dataset(root, verify=verify)
    shape = dataset.card.get("image_shape")
    if shape is None:
        raise DataError("images differ in shape; use the streaming reader or ingest with a resize",
                        path=dataset.root)
    height, width, channels = shape
    manifest = read_manifest(dataset.manifest_path)
    expected = dict(zip(manifest.column("key").to_pylist(), manifest.column("sha256").to_pylist()))
    images = np.empty((len(dataset), height, width, channels), dtype=np.uint8)
    labels = np.empty(len(dataset), dtype=np.int64)
    keys: list[str] = []
    mode = "L" if channels == 1 else "RGB"
    bar = tqdm(total=len(dataset), unit="img", desc=f"load {dataset.root.name}",
               disable=not progress, leave=False)
    for path in dataset.shards:
        for record in iter_shard_records(path):
            key, png = record["__key__"], record.get("png")
            if png is None:
                raise DataError("sample has no png member", path=path, key=key)
            if verify and expected.get(key) != sha256_bytes(png):
                raise IntegrityError("image bytes do not match the manifest's sha256"
                                     if key in expected else "key is not in the manifest",
                                     path=path, key=key)
            index = len(keys)
            if index >= len(images):
                raise DataError("shards hold more samples than card.json declares", path=path, key=key)
            image = decode_image(png, path=path, key=key, mode=mode)
            if image.shape != images.shape[1:]:
                raise DataError(f"image shape {image.shape} differs from the card's {tuple(shape)}",
                                path=path, key=key)
            images[index] = image
            labels[index] = decode_label(record["cls"], str(path), key)
            keys.append(key)
            bar.update()
    bar.close()
    if len(keys) != len(dataset):
        raise DataError(f"shards hold {len(keys)} samples, card.json declares {len(dataset)}",
                        path=dataset.root)
    return InMemoryDataset(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                           torch.from_numpy(labels), keys, dataset.classes)

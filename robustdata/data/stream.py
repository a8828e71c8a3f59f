"""Streaming reader: shards read one after another, for sets that do not fit in memory.

Shards are read in order (or in a seeded shuffled order per epoch) and split
across DataLoader workers; each sample is decoded by the safe decoder of
`shards.py` (png/jpg/cls/json/txt only).
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from robustdata.data.manifest import CARD_NAME, Dataset, open_dataset
from robustdata.data.shards import Sample, iter_shards
from robustdata.errors import DataError


def to_tensors(sample: Sample) -> tuple[torch.Tensor, int]:
    """(float image (C, H, W) in [0, 1], label)."""
    image = torch.from_numpy(sample.image).permute(2, 0, 1).float().div_(255.0)
    return image, sample.label


class ShardStream(IterableDataset):
    """Iterate the samples of a dataset's shards, streaming.

    shuffle_seed: None keeps shard order; an int shuffles shard order with a
    torch.Generator seeded by (seed, epoch) so every worker agrees.
    """

    def __init__(self, dataset: str | Path | Dataset, transform: Callable[[Sample], Any] = to_tensors,
                 shuffle_seed: int | None = None, verify: bool = True):
        self.dataset = dataset if isinstance(dataset, Dataset) else open_dataset(dataset, verify=verify)
        self.transform = transform
        self.shuffle_seed = shuffle_seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard_order(self) -> list[Path]:
        shards = self.dataset.shards
        if self.shuffle_seed is None:
            return shards
        generator = torch.Generator().manual_seed(self.shuffle_seed * 100003 + self.epoch)
        return [shards[i] for i in torch.randperm(len(shards), generator=generator).tolist()]

    def __iter__(self) -> Iterator[Any]:
        shards = self.shard_order()
        worker = get_worker_info()
        if worker is not None:
            shards = shards[worker.id::worker.num_workers]
        for sample in iter_shards(shards, num_classes=len(self.dataset.classes)):
            yield self.transform(sample)

    def __len__(self) -> int:
        """The card's num_samples. list() and DataLoader preallocate from it, so a card claiming
        more samples than its shards have room for (a header and a data block each) is refused."""
        count = self.dataset.card["num_samples"]  # not len(): that fails on counts past sys.maxsize
        room = sum(file_size(path) for path in self.dataset.shards) // MIN_SAMPLE_BYTES
        if count > room:
            raise DataError(f"card.json claims {count} samples, its shards have room for at most {room}",
                            path=self.dataset.root / CARD_NAME)
        return count


MIN_SAMPLE_BYTES = 2 * tarfile.BLOCKSIZE  # a member header and one data block


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise DataError(f"unreadable shard ({exc.strerror or exc})", path=path) from exc

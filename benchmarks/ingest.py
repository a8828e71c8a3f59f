#!/usr/bin/env python
"""Benchmark: MNIST ingest, and reading the ingested images three ways vs torchvision.

One run measures, on the same images (MNIST mirror, train split, 50k):
  1. loading the source (sha256 check + unpickle) and `ingest_split` (PNG shards);
  2. reading every image once as float tensors (C, H, W) in [0, 1] plus labels:
     the streaming reader, the in-memory loader, and torchvision's own MNIST
     class reading the same pixels from IDX files written for it.
Each measurement is repeated; the table shows medians, and the JSON report at
reports/bench/ingest.json keeps every repeat.

    python benchmarks/ingest.py [--limit N] [--repeats R]
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as `python benchmarks/ingest.py` without installing
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision.transforms import ToTensor  # noqa: E402

from robustdata.config import IngestParams  # noqa: E402
from robustdata.data.ingest import ingest_split  # noqa: E402
from robustdata.data.memory import InMemoryDataset, load_in_memory  # noqa: E402
from robustdata.data.sources import Source, open_source  # noqa: E402
from robustdata.data.stream import ShardStream  # noqa: E402
from robustdata.io import code_version, write_json_atomic  # noqa: E402

SPLIT = "train"
BATCH_SIZE = 256
BASELINE = "tv_iterate"  # ratios are throughput relative to torchvision's MNIST iteration

# (timing key, method, what was timed); *_total rows are per-repeat sums, then medians.
ROWS = [
    ("source_load", "mnist source", "prepare + unpickle (sha256-checked)"),
    ("ingest", "ingest_split", "PNG-encode; write shards, manifest, card"),
    ("stream", "ShardStream", "open (verify) + one pass, DataLoader(256)"),
    ("memory_load", "load_in_memory", "first load: decode all shards (verify hashes)"),
    ("memory_load_cached", "load_in_memory", "later loads: decoded cache (verify hashes)"),
    ("memory_epoch", "InMemoryDataset", "one epoch of .batches(256)"),
    ("memory_total", "InMemoryDataset", "first load + one epoch"),
    ("memory_cached_total", "InMemoryDataset", "later load + one epoch"),
    ("tv_construct", "torchvision MNIST", "construct (read IDX files)"),
    ("tv_iterate", "torchvision MNIST", "one pass, DataLoader(256), ToTensor"),
    ("tv_total", "torchvision MNIST", "construct + one pass"),
]
TOTALS = {"memory_total": ("memory_load", "memory_epoch"),
          "memory_cached_total": ("memory_load_cached", "memory_epoch"),
          "tv_total": ("tv_construct", "tv_iterate")}
# The source load reads the whole pickle whatever --limit is, so a rate would mislead.
NO_RATE = {"source_load"}


# --------------------------------------------------------------------------- helpers


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def check(condition: bool, message: str) -> None:
    # Not `assert`: the check must still run under `python -O`.
    if not condition:
        raise AssertionError(message)


def drain(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, tuple]:
    """Consume (images, labels) batches; return the image count and the first batch.

    The first batch is kept so the readers' outputs can be compared after timing.
    """
    count, first = 0, None
    for images, labels in batches:
        if first is None:
            first = (images, labels)
        count += len(labels)
    return count, first


def load_source() -> Source:
    """A fresh MNIST source with its pickle loaded (the mirror unpickles on first iteration)."""
    source = open_source("mnist")
    source.prepare()
    next(iter(source.iter_split(SPLIT)))
    return source


def source_arrays(source: Source, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The split's first `limit` images (N, H, W) and labels, exactly as ingest saw them."""
    samples = list(itertools.islice(source.iter_split(SPLIT), limit))
    return np.stack([s.image[:, :, 0] for s in samples]), np.array([s.label for s in samples], np.uint8)


# --------------------------------------------------------------------------- torchvision's input


def write_idx(path: Path, array: np.ndarray) -> None:
    # IDX: two zero bytes, type 0x08 (uint8), ndim, then each dim as big-endian uint32.
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_torchvision_mnist(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Lay out `images` (N, 28, 28) as torchvision's MNIST/raw files under `root`."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte", images)
    write_idx(raw / "train-labels-idx1-ubyte", labels)
    # torchvision insists the test files exist even for train=True; they are never read.
    write_idx(raw / "t10k-images-idx3-ubyte", images[:16])
    write_idx(raw / "t10k-labels-idx1-ubyte", labels[:16])


# --------------------------------------------------------------------------- one repeat


def check_same(num_images: int, memory: InMemoryDataset, tv: torchvision.datasets.MNIST,
               counts: dict[str, int], firsts: dict[str, tuple]) -> None:
    """The comparison is only honest if every reader hands out the same pixels and labels."""
    check(all(n == num_images for n in counts.values()), f"readers saw {counts}, expected {num_images}")
    check(torch.equal(tv.data, memory.images[:, 0]), "torchvision's images differ from load_in_memory's")
    check(torch.equal(tv.targets, memory.labels), "torchvision's labels differ from load_in_memory's")
    ref_images, ref_labels = firsts["memory_epoch"]
    for name, (images, labels) in firsts.items():
        check(torch.equal(images, ref_images) and torch.equal(labels, ref_labels),
              f"{name}'s first float batch differs from the in-memory loader's")


def run_repeat(work: Path, limit: int | None, shard_size: int) -> tuple[dict[str, float], int]:
    """Time every step once inside `work`; return {timing key: seconds} and the image count."""
    t: dict[str, float] = {}
    counts: dict[str, int] = {}
    firsts: dict[str, tuple] = {}
    data = work / "mnist-train"
    t["source_load"], source = timed(load_source)
    t["ingest"], card = timed(ingest_split, source, SPLIT, data, shard_size=shard_size, limit=limit,
                              params={"source": "mnist", "shard_size": shard_size, "limit": limit},
                              progress=False)
    t["stream"], (counts["stream"], firsts["stream"]) = timed(
        lambda: drain(DataLoader(ShardStream(data), batch_size=BATCH_SIZE, num_workers=0)))
    # A cache directory private to this repeat, so the first load really decodes.
    cache = work / "decoded-cache"
    t["memory_load"], _ = timed(load_in_memory, data, verify=True, progress=False, cache_dir=cache)
    t["memory_load_cached"], memory = timed(load_in_memory, data, verify=True, progress=False, cache_dir=cache)
    t["memory_epoch"], (counts["memory_epoch"], firsts["memory_epoch"]) = timed(
        drain, memory.batches(BATCH_SIZE))
    write_torchvision_mnist(work, *source_arrays(source, limit))  # setup, not timed
    t["tv_construct"], tv = timed(torchvision.datasets.MNIST, work, train=True, download=False,
                                  transform=ToTensor())
    t["tv_iterate"], (counts["tv_iterate"], firsts["tv_iterate"]) = timed(
        drain, DataLoader(tv, batch_size=BATCH_SIZE, num_workers=0))
    check_same(card["num_samples"], memory, tv, counts, firsts)
    for total, parts in TOTALS.items():
        t[total] = sum(t[p] for p in parts)
    return t, card["num_samples"]


# --------------------------------------------------------------------------- report


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "torch_num_threads": torch.get_num_threads(),
    }


def summarize(repeats: list[dict[str, float]], num_images: int) -> dict[str, dict[str, float | None]]:
    medians = {key: statistics.median(r[key] for r in repeats) for key, _, _ in ROWS}
    rates = {key: None if key in NO_RATE else num_images / sec for key, sec in medians.items()}
    ratios = {key: None if rate is None else rate / rates[BASELINE] for key, rate in rates.items()}
    return {"median_seconds": medians, "images_per_second": rates, "ratio_vs_torchvision_iterate": ratios}


def print_table(summary: dict[str, dict[str, float | None]], num_images: int, repeats: int) -> None:
    table = Table(title=f"MNIST {SPLIT}: {num_images} images, median of {repeats} repeat(s)")
    for name, justify in [("method", "left"), ("what", "left"), ("seconds", "right"),
                          ("images/s", "right"), ("vs torchvision iter", "right")]:
        table.add_column(name, justify=justify)
    for key, method, what in ROWS:
        rate, ratio = summary["images_per_second"][key], summary["ratio_vs_torchvision_iterate"][key]
        table.add_row(method, what, f"{summary['median_seconds'][key]:.3f}",
                      "-" if rate is None else f"{rate:,.0f}", "-" if ratio is None else f"{ratio:.2f}x")
    Console(width=None if sys.stdout.isatty() else 120).print(table)  # logs get the full table


# --------------------------------------------------------------------------- main


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="use only the first N train images (default: all 50k)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="repeats; the table shows medians")
    parser.add_argument("--shard-size", type=positive_int, default=IngestParams().shard_size,
                        help="samples per shard (the ingest stage's default)")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "bench" / "ingest.json",
                        help="JSON report path")
    parser.add_argument("--tmp-dir", type=Path, default=None,
                        help="where the temporary datasets go (default: the system temp dir)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    log = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
    repeats, num_images = [], 0
    for index in range(args.repeats):
        # A fresh directory per repeat, so every repeat ingests from scratch.
        with tempfile.TemporaryDirectory(prefix="rd-bench-ingest-", dir=args.tmp_dir) as work:
            timings, num_images = run_repeat(Path(work), args.limit, args.shard_size)
        repeats.append(timings)
        log.log(f"repeat {index + 1}/{args.repeats}: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    summary = summarize(repeats, num_images)
    print_table(summary, num_images, args.repeats)
    report = {
        "benchmark": "ingest", "split": SPLIT, "num_images": num_images, "batch_size": BATCH_SIZE,
        "machine": machine_info(), "code_version": code_version(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": [{"key": k, "method": m, "what": w} for k, m, w in ROWS],
        "repeats": repeats, **summary,
    }
    write_json_atomic(args.out, report)
    log.log(f"wrote {args.out}")


if __name__ == "__main__":
    main()

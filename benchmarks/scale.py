#!/usr/bin/env python
"""Benchmark: the streaming audit's time and memory against the number of samples.

A synthetic training set of small images (1 x 8 x 8 uint8, 10 classes: a fixed
random prototype per class plus pixel noise) with planted source-specific
BadNets poisons: a 2x2 white square in the bottom-right corner stamped on
--poison-rate (10%) of the images of class --source (1), relabelled to class 0
(~1% of the set, ~9% of class 0). The set is never stored: batch i is generated
from its own seeded torch.Generator, so both passes of the audit (and every
size) see the same samples.

Why this attack: the audit names the poison side of a split by input space (a
poison lies near its source class), which assumes a small trigger. A 3x3 square
covers 14% of an 8x8 image and moves it as far as the class centroids lie apart,
and the filter then removed the clean side (recall 0); at 2x2 (6%) it works. With
all-to-one poisons (--source all) the 300-step model keeps each poison's source
class in its representation, nine loose clusters instead of one: recall 53% at
20k samples (79% after 1000 steps), which measures the model, not the scaling.

The audited model is the small CNN (penultimate layer, D = 1024) trained for
--train-steps Adam steps on a fresh sample of the same distribution, enough for
the trigger to shape its representation. Each size is audited by
robustdata.audit.streaming.stream_audit (filter, spectral signatures, activation
clustering; auto mode) in a fresh subprocess, so its peak RSS
(resource.getrusage, ru_maxrss; on Linux reset to the current RSS just before
the audit, so the import of torch does not mask it) is its own. Reported per size: audit time
(generation of the synthetic batches excluded and shown apart), samples/s,
peak RSS and its growth over the process's RSS before the audit, recall and FPR
of the planted poisons. Then the least-squares slopes of log time and log RSS
growth against log N: ~1 means linear, ~0 flat. Memory is O(N q + classes D^2):
the (N, 16) coordinates and a few (N,) vectors grow, the 10 x 1024^2 float64
scatter matrices (80 MB) do not.
Prints a table and writes reports/bench/scale.json.

    python benchmarks/scale.py [--sizes 100000 300000 1000000] [--batch-size 4096] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from robustdata.audit.metrics import confusion  # noqa: E402
from robustdata.audit.streaming import STREAM_METHODS, stream_audit  # noqa: E402
from robustdata.io import code_version, write_json_atomic  # noqa: E402
from robustdata.train.models import SmallCNN  # noqa: E402

log = Console(stderr=True)
wide = Console(width=200)
TARGET, CHANNELS, SIZE, CLASSES = 0, 1, 8, 10
TRIGGER = 2  # side of the white square in the bottom-right corner (see the docstring)
NOISE_SD = 40.0


class SyntheticSet:
    """Re-iterable (images uint8 (B, 1, 8, 8), labels (B,)) batches of a seeded poisoned set of n samples.

    poison_rate: the fraction of the images of class `source` (of every class but TARGET when None) poisoned.

    Batch i draws from torch.Generator().manual_seed(seed * 1_000_003 + i): the same batch every pass. The
    class prototypes come from `distribution_seed`, shared by the audited set, the model's training sample
    and its test sample. The ground truth (is_poison) of the last complete pass is kept in `truth` (N bools).
    """

    def __init__(self, n: int, batch_size: int, seed: int, poison_rate: float, distribution_seed: int = 0,
                 source: int | None = 1):
        self.n, self.batch_size, self.seed, self.poison_rate, self.source = n, batch_size, seed, poison_rate, source
        prototypes = torch.rand(CLASSES, CHANNELS, SIZE, SIZE,
                                generator=torch.Generator().manual_seed(distribution_seed))
        self.prototypes = prototypes * 160 + 20  # in [20, 180]: the trigger's 255 stands out
        self.truth: torch.Tensor | None = None
        self.generation_seconds = 0.0

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        size = min(self.batch_size, self.n - index * self.batch_size)
        drawn = torch.randint(CLASSES, (size,), generator=g)  # the class each image is drawn from
        eligible = drawn != TARGET if self.source is None else drawn == self.source
        poison = (torch.rand(size, generator=g) < self.poison_rate) & eligible
        images = self.prototypes[drawn] + NOISE_SD * torch.randn(size, CHANNELS, SIZE, SIZE, generator=g)
        images[poison, :, -TRIGGER:, -TRIGGER:] = 255.0
        labels = torch.where(poison, torch.tensor(TARGET), drawn)
        return images.clamp_(0, 255).round_().to(torch.uint8), labels, poison

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        truth = []
        for index in range(len(self)):
            start = time.perf_counter()
            images, labels, poison = self.batch(index)
            truth.append(poison)
            self.generation_seconds += time.perf_counter() - start
            yield images, labels
        self.truth = torch.cat(truth)

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


def train_model(steps: int, seed: int, poison_rate: float, source: int | None, device: torch.device
                ) -> tuple[SmallCNN, dict]:
    """The small CNN (D = 1024 penultimate) after `steps` Adam steps of 256 on a fresh sample of the set."""
    torch.manual_seed(seed)
    model = SmallCNN(num_classes=CLASSES, in_channels=CHANNELS, image_size=SIZE).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train = SyntheticSet(steps * 256, 256, seed + 1, poison_rate, distribution_seed=seed, source=source)
    start = time.perf_counter()
    model.train()
    for images, labels in train:
        loss = F.cross_entropy(model(images.to(device).float() / 255), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    test = SyntheticSet(4096, 4096, seed + 2, 0.0, distribution_seed=seed)
    images, labels, _ = test.batch(0)
    triggered = images.clone()
    triggered[:, :, -TRIGGER:, -TRIGGER:] = 255
    with torch.no_grad():
        accuracy = float((model(images.to(device).float() / 255).argmax(1).cpu() == labels).float().mean())
        hit = model(triggered.to(device).float() / 255).argmax(1).cpu() == TARGET
        asr = float(hit[labels != TARGET if source is None else labels == source].float().mean())
    return model, {"steps": steps, "seconds": time.perf_counter() - start, "clean_accuracy": accuracy, "asr": asr}


def rss_mb() -> float:
    """Peak resident set size of this process so far, MB (ru_maxrss is KB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def reset_peak_rss() -> float | None:
    """Reset the peak RSS to the current RSS (Linux: clear_refs 5, which ru_maxrss follows) and return it, MB;
    None where that is not possible. Without it the peak of importing torch (transient, larger than the
    audit's own growth at small N) would hide the audit's allocations."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        status = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def child(args: argparse.Namespace) -> None:
    """Audit one size; print one JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = SmallCNN(num_classes=CLASSES, in_channels=CHANNELS, image_size=SIZE).to(device)
    model.load_state_dict(torch.load(args.model, map_location=device, weights_only=True))
    data = SyntheticSet(args.child, args.batch_size, args.seed, args.poison_rate, distribution_seed=args.seed,
                        source=args.source)
    # warm up the kernels on a batch of the set itself, so the first timed batch pays no one-off cost
    with torch.no_grad():
        model(data.batch(0)[0][:256].to(device).float() / 255)
    data.generation_seconds = 0.0
    baseline = reset_peak_rss()
    peak_reset = baseline is not None
    baseline = rss_mb() if baseline is None else baseline
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = stream_audit(model, data, CLASSES, layer="penultimate", methods=STREAM_METHODS,
                          generator=torch.Generator(device=device).manual_seed(args.seed))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    peak = rss_mb()
    truth = data.truth.to(result.removed.device)
    overall = confusion(result.removed.cpu(), truth.cpu())
    out = {"n": args.child, "batches": len(data), "poisons": int(truth.sum()),
           "wall_seconds": wall, "generation_seconds": data.generation_seconds,
           "audit_seconds": wall - data.generation_seconds, "phase_seconds": result.seconds,
           "samples_per_second": args.child / (wall - data.generation_seconds),
           "rss_baseline_mb": baseline, "rss_peak_mb": peak, "rss_growth_mb": peak - baseline,
           "rss_peak_reset": peak_reset,
           "gpu_peak_mb": torch.cuda.max_memory_allocated(device) / (1 << 20) if device.type == "cuda" else None,
           "recall": overall["tpr"], "fpr": overall["fpr"], "precision": overall["precision"],
           "flagged": int(result.removed.sum()),
           "poisoned_classes": [c["label"] for c in result.classes if c["poisoned"]],
           "statuses": sorted({c["status"] for c in result.classes}),
           "separations": [c["statistic"] for c in result.classes], "threshold": result.threshold}
    print(json.dumps(out))


def source_class(text: str) -> int | None:
    if text == "all":
        return None
    value = int(text)
    if not 0 <= value < CLASSES or value == TARGET:
        raise argparse.ArgumentTypeError(f"source must be 'all' or a class in 1..{CLASSES - 1}")
    return value


def slope(sizes: list[float], values: list[float]) -> float | None:
    """Least-squares slope of log(value) on log(size): 1 = linear, 0 = flat."""
    points = [(math.log(s), math.log(v)) for s, v in zip(sizes, values) if v > 0]
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def percent(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def print_table(report: dict[str, Any]) -> None:
    fits = report["fits"]
    table = Table(title=f"streaming audit scale ({report['device']}, {report['threads']} threads, batch "
                        f"{report['batch_size']}); slope of log time vs log N: {fits['time_slope']:.3f}, "
                        f"of log RSS growth: {fits['rss_growth_slope']:.3f}, of log peak RSS: "
                        f"{fits['rss_peak_slope']:.3f}" if fits["time_slope"] is not None else
                  "streaming audit scale")
    for column in ("N", "poisons", "audit s", "generation s", "samples/s", "pass 1 s", "pass 2 s", "scoring s",
                   "peak RSS MB", "RSS growth MB", "recall %", "FPR %", "classes flagged"):
        table.add_column(column, justify="right")
    for run in report["runs"]:
        phases = run["phase_seconds"]
        table.add_row(f"{run['n']:,}", str(run["poisons"]), f"{run['audit_seconds']:.1f}",
                      f"{run['generation_seconds']:.1f}", f"{run['samples_per_second']:,.0f}",
                      f"{phases['pass1']:.1f}", f"{phases['pass2']:.1f}", f"{phases['scoring']:.1f}",
                      f"{run['rss_peak_mb']:.0f}", f"{run['rss_growth_mb']:.0f}", percent(run["recall"]),
                      percent(run["fpr"], 3), str(run["poisoned_classes"]))
    wide.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--batch-size", type=int, default=4096, help="images per generated batch")
    parser.add_argument("--poison-rate", type=float, default=0.1,
                        help="fraction of the source class's images poisoned (of every other class's with all)")
    parser.add_argument("--source", type=source_class, default=1, help="poisoned source class, or 'all'")
    parser.add_argument("--train-steps", type=int, default=300, help="Adam steps of 256 for the audited model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per child (0: torch's default)")
    parser.add_argument("--out", type=Path, default=REPO / "reports/bench/scale.json")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, training = train_model(args.train_steps, args.seed, args.poison_rate, args.source, device)
    log.log(f"model: {training}")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.pt"
        torch.save(model.state_dict(), weights)
        for n in sorted(args.sizes):
            command = [sys.executable, __file__, "--child", str(n), "--model", str(weights), "--batch-size",
                       str(args.batch_size), "--poison-rate", str(args.poison_rate), "--seed", str(args.seed),
                       "--source", "all" if args.source is None else str(args.source),
                       "--device", args.device, "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"error: the audit of {n} samples failed:\n{done.stderr}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            log.log(f"{n:,}: {runs[-1]['audit_seconds']:.1f} s, peak RSS {runs[-1]['rss_peak_mb']:.0f} MB, "
                    f"recall {runs[-1]['recall']}")
    sizes = [r["n"] for r in runs]
    report = {
        "sizes": sizes, "runs": runs, "model": training,
        "fits": {"time_slope": slope(sizes, [r["audit_seconds"] for r in runs]),
                 "wall_slope": slope(sizes, [r["wall_seconds"] for r in runs]),
                 "rss_peak_slope": slope(sizes, [r["rss_peak_mb"] for r in runs]),
                 "rss_growth_slope": slope(sizes, [r["rss_growth_mb"] for r in runs])},
        "batch_size": args.batch_size, "poison_rate": args.poison_rate, "target": TARGET,
        "source": "all" if args.source is None else args.source, "trigger": f"{TRIGGER}x{TRIGGER} white square",
        "device": args.device,
        "threads": args.threads or torch.get_num_threads(), "methods": list(STREAM_METHODS),
        "image_shape": [CHANNELS, SIZE, SIZE], "classes": CLASSES, "feature_dim": 1024,
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "built_by": code_version(),
    }
    write_json_atomic(args.out, report)
    print_table(report)
    log.log(f"wrote {args.out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Benchmark: standard and robust MNIST training, and training throughput vs a plain DataLoader loop.

One run measures, with the params of params.yaml (train_standard, train_robust):
  1. standard model: training wall time and test accuracy, over --seeds seeds;
  2. throughput: training images/s of the project's loop (in-memory uint8 batches,
     bf16 autocast, channels_last) against a plain `DataLoader(TensorDataset)`
     fp32 loop over the same data and model, side by side, alternating, median of
     --repeats; the project's loop in fp32 too, to show where the gain comes from;
  3. robust model: adversarial-training wall time, clean test accuracy, and robust
     accuracy under PGD-50 with 10 restarts (Linf 0.3) on the first --robust-limit
     test images (--skip-robust to leave it out).
Prints a table and writes reports/bench/train.json; runs on CUDA when present.

    python benchmarks/train.py [--seeds 3] [--repeats 3] [--robust-limit 2000]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from robustdata.config import AttackParams, TrainParams, load_params  # noqa: E402
from robustdata.data.memory import InMemoryDataset, load_in_memory  # noqa: E402
from robustdata.io import code_version, write_json_atomic  # noqa: E402
from robustdata.train.training import evaluate_model, fit, resolve_device, seeded_model, train_model  # noqa: E402

log = Console(stderr=True)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def standard_runs(train, val, test, params, seeds: list[int]) -> list[dict[str, Any]]:
    runs = []
    for seed in seeds:
        model, info = fit(train, val, params.model_copy(update={"seed": seed}), progress=False)
        report = evaluate_model(model, test, [])
        runs.append({"seed": seed, "train_seconds": info["train_seconds"], "test_accuracy": report["clean"]["accuracy"]})
        log.log(f"standard seed {seed}: {runs[-1]}")
    return runs


def plain_loop_throughput(model, data: InMemoryDataset, config: TrainParams, steps: int) -> float:
    """What a user writes by default: DataLoader over a float TensorDataset, fp32, SGD."""
    device = next(model.parameters()).device
    dataset = TensorDataset(data.images.float() / 255, data.labels)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=config.momentum, nesterov=True)
    model.train()
    done, start = 0, time.perf_counter()
    for step, (x, y) in enumerate(loader):
        if step == steps:
            break
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        done += len(y)
    return done / (time.perf_counter() - start)


def project_loop_throughput(model, data: InMemoryDataset, config: TrainParams, steps: int) -> float:
    limited = InMemoryDataset(data.images[: steps * config.batch_size], data.labels[: steps * config.batch_size],
                              data.keys, data.classes)
    one_epoch = config.model_copy(update={"epochs": 1})
    start = time.perf_counter()
    train_model(model, limited, one_epoch, torch.Generator().manual_seed(0), progress=False)
    return len(limited) / (time.perf_counter() - start)


def throughput(train: InMemoryDataset, params: TrainParams, repeats: int, steps: int) -> dict[str, list[float]]:
    fp32 = params.model_copy(update={"precision": "fp32", "channels_last": False})
    device = resolve_device(params.device)
    shape = train.images.shape
    results: dict[str, list[float]] = {"plain_dataloader_fp32": [], "project_fp32": [], "project": []}
    for _ in range(repeats):  # alternate, so drifting machine load hits every method alike
        for name in results:
            model = seeded_model(params.arch, len(train.classes), shape[1], shape[2], 0, device)
            warm = 5  # oneDNN picks kernels on the first steps
            if name == "plain_dataloader_fp32":
                plain_loop_throughput(model, train, params, warm)
                results[name].append(plain_loop_throughput(model, train, params, steps))
            else:
                cfg = fp32 if name == "project_fp32" else params
                project_loop_throughput(model, train, cfg, warm)
                results[name].append(project_loop_throughput(model, train, cfg, steps))
        log.log({k: round(v[-1]) for k, v in results.items()})
    return results


def robust_run(train, val, test, params, limit: int) -> dict[str, Any]:
    model, info = fit(train, val, params, progress=True)
    attack = AttackParams(threat="linf", eps=0.3, steps=50, step_size=0.01, restarts=10)
    report = evaluate_model(model, test, [attack], limit=limit, progress=True)
    return {"train_seconds": info["train_seconds"], "epochs_run": len(info["history"]), "history": info["history"],
            "clean_accuracy": report["clean"]["accuracy"], "pgd50x10_accuracy": report["robust"][0]["accuracy"],
            "attacked": report["robust"][0]["n"], "attack_seconds": report["robust"][0]["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--seeds", type=int, default=3, help="seeds for the standard model")
    parser.add_argument("--repeats", type=int, default=3, help="throughput repeats (medians reported)")
    parser.add_argument("--steps", type=int, default=100, help="training steps per throughput measurement")
    parser.add_argument("--robust-limit", type=int, default=2000, help="test images attacked by PGD-50x10")
    parser.add_argument("--skip-robust", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "bench" / "train.json")
    args = parser.parse_args()
    params = load_params(args.params)
    data = Path(params.train_standard.data)
    train, val, test = (load_in_memory(data / s, progress=False) for s in ("train", "val", "test"))
    device = resolve_device(params.train_standard.device)

    standard = standard_runs(train, val, test, params.train_standard, list(range(args.seeds)))
    speed = throughput(train, params.train_standard, args.repeats, args.steps)
    robust = None if args.skip_robust else robust_run(train, val, test, params.train_robust, args.robust_limit)

    acc_mean, acc_std = mean_std([r["test_accuracy"] for r in standard])
    sec_mean, sec_std = mean_std([r["train_seconds"] for r in standard])
    medians = {k: statistics.median(v) for k, v in speed.items()}
    table = Table(title=f"MNIST training on {device} ({torch.get_num_threads()} threads)")
    for column in ("what", "result", "target"):
        table.add_column(column)
    table.add_row("standard: test accuracy", f"{100 * acc_mean:.2f}% +- {100 * acc_std:.2f} ({args.seeds} seeds)", ">= 99.0%")
    table.add_row("standard: training wall time", f"{sec_mean:.1f} s +- {sec_std:.1f}", "<= 60 s")
    for name, value in medians.items():
        table.add_row(f"throughput: {name}", f"{value:,.0f} img/s", "")
    ratio = medians["project"] / medians["plain_dataloader_fp32"]
    table.add_row("throughput ratio project / plain DataLoader", f"{ratio:.2f}x", ">= 1.5x")
    if robust:
        table.add_row("robust: clean test accuracy", f"{100 * robust['clean_accuracy']:.2f}%", ">= 98%")
        table.add_row(f"robust: PGD-50 x10 Linf 0.3 (first {robust['attacked']} test images)",
                      f"{100 * robust['pgd50x10_accuracy']:.2f}%", ">= 89%")
        table.add_row("robust: training wall time", f"{robust['train_seconds'] / 60:.1f} min "
                      f"({robust['epochs_run']} epochs)", "<= 20 min")
    Console(width=120).print(table)
    write_json_atomic(args.out, {
        "benchmark": "train", "device": str(device), "machine": {
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "args": {k: str(v) for k, v in vars(args).items()}, "params": params.model_dump(mode="json"),
        "standard": {"runs": standard, "test_accuracy_mean": acc_mean, "test_accuracy_std": acc_std,
                     "train_seconds_mean": sec_mean},
        "throughput": {"repeats": speed, "medians": medians, "ratio_project_vs_plain": ratio},
        "robust": robust, "code_version": code_version(),
    })
    log.log(f"wrote {args.out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Benchmark: robust / non-robust feature datasets on MNIST (Ilyas et al. 2019), quality and speed.

Speed: D_R build throughput (image-steps/s of `invert_representation` with the
build_robust recipe: its steps, schedule and smoothed ReLU gradients) against the raw
forward + input-gradient backward of the same model at the same batch size and
precision (the physical limit of the method), side by side, alternating, median of
--repeats; on CUDA too when present.

Quality: with the full profile's build_* and robustify_eval sections (outputs redirected
under --work), build D_R, D_NR, D_rand and D_det through the real build flow, train
standard classifiers on D (the same number of original images) and on each D_*
(seeds x learning-rate sweep), evaluate each on the original test set (clean, and
PGD with restarts at Linf 0.1/0.2/0.3 and L2 1/2), and check the issue's targets.
The standard, plain and robust models are trained here with the profile's recipe, under
--work (kept: a rerun reuses them).

    python benchmarks/robustify.py [--speed-only] [--profile full] [--work bench-work/robustify] [--repeats 5]

Prints the tables and writes reports/bench/robustify.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from robustdata.config import BuildParams, Params, load_params  # noqa: E402
from robustdata.data.memory import load_in_memory  # noqa: E402
from robustdata.io import code_version, read_json, write_json_atomic  # noqa: E402
from robustdata.train.models import autocast, representation  # noqa: E402
from robustdata.robustify.builders import (StepConfig, average_pool_gradients, frozen,  # noqa: E402
                                  invert_representation)
from robustdata.train.training import load_checkpoint, resolve_device  # noqa: E402
from robustdata.robustify.recipe import step_config  # noqa: E402

log = Console(stderr=True)
wide = Console(width=200)
KINDS = ("robust", "nonrobust", "rand", "det")


# ---------------------------------------------------------------------------------------------------- speed


def raw_forward_backward(model, x: torch.Tensor, layer: str, steps: int, precision: str, pool_grad: str = "max"
                         ) -> float:
    """Seconds for `steps` bare forward + input-gradient backward passes: no projection, no bookkeeping.
    pool_grad "avg": through the builder's pools (average_pool_gradients) instead of the model's own."""
    with frozen(model), average_pool_gradients(model, pool_grad):
        x = x.clone().requires_grad_(True)
        sync(x.device)
        start = time.perf_counter()
        for _ in range(steps):
            with autocast(x.device, precision):
                out = representation(model, x, layer).float().square().sum()
            (grad,) = torch.autograd.grad(out, x)
        sync(x.device)
    return time.perf_counter() - start


def inversion(model, targets: torch.Tensor, starts: torch.Tensor, layer: str, config: StepConfig
              ) -> tuple[float, torch.Tensor]:
    """(seconds, the built images) of the D_R builder's inversion of one batch (its recipe, its final
    measure included)."""
    sync(targets.device)
    start = time.perf_counter()
    built, _ = invert_representation(model, targets, starts, layer, config)
    sync(targets.device)
    return time.perf_counter() - start, built


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed(model, images: torch.Tensor, build: BuildParams, steps: int, repeats: int, precision: str
          ) -> dict[str, Any]:
    """The D_R builder's recipe (step schedule, smoothed ReLU gradients) at `steps` steps vs the bare passes.

    The bare passes run on the images the builder works on (its outputs, x_r), because the same model
    runs measurably faster on clean digits: CPU max-pooling is data-dependent and about 5x quicker on
    mostly-black images than on the dense iterates. Bare passes on the clean targets are reported too, and
    bare passes through the builder's own pools: with pool_grad avg their forward is a max of strided
    slices, faster on CPU than the model's nn.MaxPool2d, so the ratio to those passes is the loop's
    overhead alone (projection, step schedule, smoothed ReLU gradients).
    """
    device, batch_size, layer = next(model.parameters()).device, build.batch_size, build.layer
    config = replace(step_config(build), steps=steps, precision=precision)
    warm_up = replace(config, steps=3)
    x = images[:batch_size].to(device).float().div(255.0)
    starts = images[batch_size:2 * batch_size].to(device).float().div(255.0)
    raw_forward_backward(model, x, layer, 3, precision)  # warm-up: kernels, allocator
    inversion(model, x, starts, layer, warm_up)
    raw, clean, same_pools, ours = [], [], [], []
    for _ in range(repeats):  # alternate, so drift in machine load hits all alike
        seconds, built = inversion(model, x, starts, layer, config)
        ours.append(batch_size * steps / seconds)
        raw.append(batch_size * steps / raw_forward_backward(model, built, layer, steps, precision))
        clean.append(batch_size * steps / raw_forward_backward(model, x, layer, steps, precision))
        same_pools.append(batch_size * steps / raw_forward_backward(model, built, layer, steps, precision,
                                                                    config.pool_grad))
    return {"device": str(device), "precision": precision, "batch_size": batch_size, "steps": steps,
            "relu_grad_beta": config.relu_grad_beta, "pool_grad": config.pool_grad, "schedule": config.schedule,
            "repeats": repeats, "raw_image_steps_per_s": raw, "raw_on_clean_image_steps_per_s": clean,
            "raw_through_builder_pools_image_steps_per_s": same_pools,
            "inversion_image_steps_per_s": ours, "median_raw": statistics.median(raw),
            "median_raw_on_clean": statistics.median(clean),
            "median_raw_through_builder_pools": statistics.median(same_pools),
            "median_inversion": statistics.median(ours),
            "ratio": statistics.median(ours) / statistics.median(raw),
            "ratio_to_raw_on_clean": statistics.median(ours) / statistics.median(clean),
            "ratio_to_raw_through_builder_pools": statistics.median(ours) / statistics.median(same_pools)}


# -------------------------------------------------------------------------------------------------- quality


def redirected(params: Params, work: Path) -> Params:
    """The profile's recipe with every output under `work`: the source models too, so models that
    `dvc repro` trained with another profile are never taken for this one's."""
    update: dict[str, Any] = {}
    moved: dict[Path, Path] = {}
    for name in ("train_standard", "train_plain", "train_robust"):
        section = getattr(params, name)
        moved[Path(section.out)] = work / "source-models" / name
        update[name] = section.model_copy(update={"out": moved[Path(section.out)]})
    for kind in KINDS:
        section = getattr(params, f"build_{kind}")
        update[f"build_{kind}"] = section.model_copy(
            update={"out": work / "built" / kind, "model": moved.get(Path(section.model), section.model)})
    update["robustify_eval"] = params.robustify_eval.model_copy(
        update={"models": work / "models", "out": work / "reports"})
    return params.model_copy(update=update)


SOURCE_MODELS = ("train_standard", "train_plain", "train_robust")


def ensure_models(params: Params, names: tuple[str, ...] = SOURCE_MODELS) -> None:
    from robustdata.flows.train import train_flow

    for section in (getattr(params, name) for name in names):
        if not (Path(section.out) / "model.pt").exists():
            log.log(f"training {section.out}")
            train_flow(section)


def quality(params: Params, work: Path, kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
    from robustdata.config import dataset_for
    from robustdata.flows.robustify import evaluate_built_flow, robustify_report_flow, run_build

    ensure_models(params)
    builds = {}
    for kind in kinds:
        section = getattr(params, f"build_{kind}")
        start = time.perf_counter()
        result = run_build(section)
        builds[kind] = {"seconds": time.perf_counter() - start, "samples": result["num_samples"],
                        "shards_built": result["shards_built"],
                        "image_steps_per_s": statistics.median(s["image_steps_per_second"] for s in result["shards"])
                        if result["shards"] else None}
        log.log(f"built {kind}: {builds[kind]}")
    results = {}
    for kind in ("original", *kinds):
        data, limit = dataset_for(kind, params)
        start = time.perf_counter()
        evaluate_built_flow(kind, data, limit, params.robustify_eval)
        results[kind] = read_json(Path(params.robustify_eval.out) / f"{kind}.json")
        results[kind]["seconds"] = time.perf_counter() - start
        log.log(f"evaluated {kind}: clean {results[kind]['clean_accuracy']}, robust {results[kind]['robust']}")
    report = robustify_report_flow(params)
    return {"builds": builds, "results": {k: {kk: vv for kk, vv in v.items() if kk != "details"}
                                          for k, v in results.items()},
            "report": report["report"], "targets": targets(results)}


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's quality targets, each with its measured value and verdict (those of the kinds evaluated)."""
    mean = lambda kind, key: results[kind]["robust"][key]["mean"]  # noqa: E731
    clean = lambda kind: results[kind]["clean_accuracy"]["mean"]  # noqa: E731
    checks = []
    if "robust" in results:
        gain = mean("robust", "linf_0.2") - mean("original", "linf_0.2")
        at_03, d_at_03 = mean("robust", "linf_0.3"), mean("original", "linf_0.3")
        checks += [
            ("D_R clean accuracy >= 97%", clean("robust"), clean("robust") >= 0.97),
            ("D_R - D robust accuracy at Linf 0.2 >= 20 pts", gain, gain >= 0.20),
            # 2.5 x 0 is 0: where D is at 0, D_R must at least be above it, or the target holds vacuously
            ("D_R / D robust accuracy at Linf 0.3 >= 2.5x (and D_R > 0)", at_03 / max(d_at_03, 1e-9),
             at_03 >= 2.5 * d_at_03 and at_03 > 0),
        ]
    if "nonrobust" in results:
        attacks = list(results["original"]["robust"])
        checks.append(("D_NR no more robust than D (within 2 pts, every attack)",
                       max(mean("nonrobust", a) - mean("original", a) for a in attacks),
                       all(mean("nonrobust", a) <= mean("original", a) + 0.02 for a in attacks)))
    if "det" in results:
        checks.append(("D_det accuracy on the original test set >= 40%", clean("det"), clean("det") >= 0.40))
    if "rand" in results:
        checks.append(("D_rand accuracy on the original test set >= 70%", clean("rand"), clean("rand") >= 0.70))
    return [{"target": name, "value": value, "met": bool(met)} for name, value, met in checks]


# ------------------------------------------------------------------------------------------------------ main


def print_tables(report: dict[str, Any]) -> None:
    table = Table(title="D_R build throughput vs raw forward + input-gradient backward (median image-steps/s)")
    for column in ("device", "precision", "batch", "steps", "raw fwd+bwd on x_r", "inversion (build)", "ratio",
                   "raw on clean x", "ratio to it", "raw, builder's pools", "ratio to it"):
        table.add_column(column, justify="right")
    for row in report["speed"]:
        table.add_row(row["device"], row["precision"], str(row["batch_size"]), str(row["steps"]),
                      f"{row['median_raw']:,.0f}", f"{row['median_inversion']:,.0f}", f"{row['ratio']:.3f}",
                      f"{row['median_raw_on_clean']:,.0f}", f"{row['ratio_to_raw_on_clean']:.3f}",
                      f"{row['median_raw_through_builder_pools']:,.0f}",
                      f"{row['ratio_to_raw_through_builder_pools']:.3f}")
    wide.print(table)
    if "quality" not in report:
        return
    quality_report = report["quality"]
    results = quality_report["results"]
    attacks = list(results["original"]["robust"])
    table = Table(title="standard classifiers trained on each dataset, original test set (mean ± std, %)")
    for column in ("trained on", "clean", *attacks, "build s", "eval s"):
        table.add_column(column, justify="right")
    for kind, r in results.items():
        build = quality_report["builds"].get(kind, {})
        table.add_row(kind, pm(r["clean_accuracy"]), *(pm(r["robust"][a]) for a in attacks),
                      f"{build.get('seconds', 0):.0f}" if build else "-", f"{r['seconds']:.0f}")
    wide.print(table)
    table = Table(title="targets")
    for column in ("target", "value", "met"):
        table.add_column(column)
    for t in quality_report["targets"]:
        table.add_row(t["target"], f"{t['value']:.4f}", "yes" if t["met"] else "NO")
    wide.print(table)


def pm(stats: dict[str, float]) -> str:
    return f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--profile", default="full", help="Laid over the params (profiles/<name>.yaml); 'none' for "
                        "params.yaml alone (the quick profile).")
    parser.add_argument("--work", type=Path, default=REPO / "bench-work" / "robustify")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--speed-steps", type=int, default=None,
                        help="Steps per timed inversion (default: build_robust.steps, what a build runs).")
    parser.add_argument("--speed-only", action="store_true", help="Skip the quality experiment (about 2 h on CPU).")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help="The built datasets of the quality experiment, comma-separated (D itself always).")
    parser.add_argument("--out", type=Path, default=REPO / "reports/bench/robustify.json")
    args = parser.parse_args()
    requested = args.kinds.split(",")
    if unknown := set(requested) - set(KINDS):
        parser.error(f"unknown --kinds {', '.join(sorted(unknown))}; valid: {', '.join(KINDS)}")
    os.chdir(REPO)
    params = redirected(load_params(args.params, profile=None if args.profile == "none" else args.profile), args.work)
    build = params.build_robust
    if not (Path(build.data) / "train").exists():
        from robustdata.flows.ingest import ingest_flow

        log.log(f"ingesting {build.data}")
        ingest_flow(params.ingest)
    train = load_in_memory(Path(build.data) / "train", progress=False)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device_name in devices:
        device = resolve_device(device_name)
        path = Path(build.model) / "model.pt"
        if not path.exists():
            ensure_models(params, ("train_robust",) if args.speed_only else SOURCE_MODELS)
        model, _ = load_checkpoint(path, device)
        for precision in ("fp32", "bf16"):
            rows.append(speed(model, train.images, build, args.speed_steps or build.steps, args.repeats, precision))
            log.log(f"speed {rows[-1]['device']} {precision}: ratio {rows[-1]['ratio']:.3f}")
    report: dict[str, Any] = {
        "speed": rows, "params": {k: getattr(params, f"build_{k}").model_dump(mode="json") for k in KINDS},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "built_by": code_version()}
    if not args.speed_only:
        start = time.perf_counter()
        kinds = tuple(kind for kind in KINDS if kind in requested)
        report["quality"] = quality(params, args.work, kinds)
        report["quality"]["seconds"] = time.perf_counter() - start
        report["robustify_eval"] = params.robustify_eval.model_dump(mode="json")
    write_json_atomic(args.out, report)
    print_tables(report)
    log.log(f"wrote {args.out}")


if __name__ == "__main__":
    main()

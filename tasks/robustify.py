"""Build robustified / non-robust-feature datasets shard by shard; train and evaluate classifiers on them."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from robustdata.robustify.sharded import BuildPlan, finish, prepare, shard_seed, write_built_shard
from robustdata.config import INVERSION_KINDS, ORIGINAL, BuildParams, RobustifyEvalParams
from robustdata.data.manifest import open_dataset, read_manifest
from robustdata.data.memory import InMemoryDataset, load_in_memory
from robustdata.data.shards import Sample, quantize
from robustdata.data.derived import module_sha256
from robustdata.errors import DataError, RobustDataError
from robustdata.io import atomic_directory, code_version, read_json, sha256_file, write_json_atomic
from robustdata.report.documents import render_markdown
from robustdata.robustify.builders import StepConfig, build_batch, input_gradients
from robustdata.report.robustify import (KIND_NAMES, document, gate_metrics, image_rows_figure, saliency_figure,
                                         write_report)
from robustdata.train.training import (evaluate_model, fit, generator_for, load_checkpoint, resolve_device, save_checkpoint,
                              subset)
from robustdata.tasks.train import MODEL_FILE

BUILD_MODULES = ("robustify/builders.py", "train/attacks.py", "train/models.py", "robustify/sharded.py")


def step_config(params: BuildParams) -> StepConfig:
    # eps null: an unbounded inversion (D_R); targeted builds refuse it in build_plan
    return StepConfig(params.steps, params.step_size, params.schedule,
                      math.inf if params.eps is None else params.eps, params.precision,
                      params.relu_grad_beta, params.pool_grad)


def content_params(params: BuildParams) -> dict[str, Any]:
    """The params that decide the bytes (not where they go, nor how many workers share the work)."""
    return params.model_dump(mode="json", exclude={"out", "device", "workers", "dask"})


def build_plan(params: BuildParams) -> BuildPlan:
    """The shards to build and the fingerprint of everything that decides their bytes."""
    if params.kind not in INVERSION_KINDS and params.eps is None:
        raise RobustDataError(f"build kind {params.kind!r} needs eps (the L2 radius of its perturbation)")
    source = open_dataset(Path(params.data) / "train")
    count = len(source) if params.limit is None else min(params.limit, len(source))
    if not (Path(params.model) / MODEL_FILE).exists():
        raise DataError(f"no {MODEL_FILE} here: train one first (`robustdata train --kind "
                        f"{'robust' if params.kind == 'robust' else 'standard'}`)", path=params.model)
    fingerprint = {
        "params": content_params(params),
        "source_manifest_sha256": source.card["manifest"]["sha256"],
        "model_sha256": sha256_file(Path(params.model) / MODEL_FILE),
        "modules_sha256": module_sha256(*BUILD_MODULES),
        # CPU kernels may sum in another order on another thread count: part of what decides the bytes
        "threads": params.threads,
    }
    return BuildPlan(Path(params.out), count, params.shard_size, fingerprint)


def set_threads(params: BuildParams) -> None:
    if params.threads is not None and torch.get_num_threads() != params.threads:
        torch.set_num_threads(params.threads)


def samples_of(kind: str, data: InMemoryDataset, index: torch.Tensor, built, images: torch.Tensor) -> list[Sample]:
    """One Sample per built image (uint8 HWC) with its lineage."""
    hwc = images.permute(0, 2, 3, 1).numpy()
    out = []
    for row, i in enumerate(index.tolist()):
        info: dict[str, Any] = {"origin_key": data.keys[i], "source_label": int(data.labels[i]), "kind": kind}
        if built.start_index is not None:
            info["start_key"] = data.keys[int(built.start_index[row])] if built.start_index[row] >= 0 else None
            info["final_distance"] = float(built.final_distance[row])
        else:
            info["target_label"] = int(built.labels[row])
            info["final_loss"] = float(built.final_loss[row])
        out.append(Sample(data.keys[i], hwc[row], int(built.labels[row]),
                          {k: v for k, v in info.items() if v is not None}))
    return out


@task(name="build-shard", cache_policy=NO_CACHE)
def build_shard_task(params: BuildParams, index: int) -> dict[str, Any]:
    """Build shard `index` of the plan and write it (tar, then its rows): paths in, a small summary out.

    Only a call: a Dask worker receives this function cloudpickled by value, and a body that touches
    `torch` drags in torch submodules that do not pickle (cloudpickle follows attribute names such as
    `.classes` to torch.classes). build_shard, a module function, pickles by reference.
    """
    return build_shard(params, index)


def build_shard(params: BuildParams, index: int) -> dict[str, Any]:
    set_threads(params)
    plan = build_plan(params)
    device = resolve_device(params.device)
    model, _ = load_checkpoint(Path(params.model) / MODEL_FILE, device)
    data = subset(load_in_memory(Path(params.data) / "train", progress=False), plan.num_samples)
    shard = torch.tensor(list(plan.shard_range(index)))
    generator = generator_for(shard_seed(params.seed, index), device)
    config = step_config(params)
    start = time.perf_counter()
    samples, distances, losses = [], [], []
    for batch in shard.split(params.batch_size):
        built = build_batch(params.kind, model, batch, data.images, data.labels, len(data.classes), params.layer,
                            config, generator, start=params.start)
        images = torch.from_numpy(quantize(built.images.detach().cpu().numpy()))
        samples.extend(samples_of(params.kind, data, batch, built.to("cpu"), images))
        if built.final_distance is not None:
            distances.append(built.final_distance.cpu())
        if built.final_loss is not None:
            losses.append(built.final_loss.cpu())
    seconds = time.perf_counter() - start
    write_built_shard(plan, index, samples)
    summary: dict[str, Any] = {"shard": index, "samples": len(samples), "seconds": seconds,
                               "image_steps_per_second": len(samples) * params.steps / max(seconds, 1e-9)}
    if distances:
        summary["mean_final_distance"] = float(torch.cat(distances).mean())
    if losses:
        summary["mean_final_loss"] = float(torch.cat(losses).mean())
    return summary


@task(name="plan-build", cache_policy=NO_CACHE)
def plan_build_task(params: BuildParams) -> dict[str, Any]:
    plan = build_plan(params)
    missing = prepare(plan)
    return {"out": str(plan.out), "num_samples": plan.num_samples, "num_shards": plan.num_shards,
            "missing": missing}


@task(name="finish-build", cache_policy=NO_CACHE)
def finish_build_task(params: BuildParams) -> dict[str, Any]:
    """Manifest + card (lineage and what built it), the source's val split alongside, renamed into place."""
    plan = build_plan(params)
    source = open_dataset(Path(params.data) / "train")
    model_sidecar = read_json((Path(params.model) / MODEL_FILE).with_suffix(".json"))
    card = {
        "name": f"{source.card['name']}-{params.kind}",
        "classes": source.classes,
        "image_shape": source.card["image_shape"],
        "image_dtype": "uint8",
        "inputs": {"source": str(source.root), "manifest_sha256": source.card["manifest"]["sha256"],
                   "model": str(params.model), "model_sha256": plan.fingerprint["model_sha256"],
                   "model_trained_adversarially": model_sidecar["params"].get("adversarial") is not None},
        "params": content_params(params),
        "built_by": {"stage": f"build_{params.kind}", **code_version(),
                     "modules_sha256": plan.fingerprint["modules_sha256"], "threads": params.threads},
    }
    written = finish(plan, card, extra_dirs={"val": Path(params.data) / "val"})
    return {"out": str(plan.out), "num_samples": written["num_samples"],
            "counts_per_class": written["counts_per_class"]}


# ------------------------------------------------------------------------------------ train and evaluate on D_*

FRAGILE_KINDS = ("nonrobust", "rand", "det")  # retraining on these is fragile: sweep the learning rate


def learning_rates(kind: str, params: RobustifyEvalParams) -> list[float]:
    return params.fragile_lrs if kind in FRAGILE_KINDS else params.lrs


@task(name="train-on", cache_policy=NO_CACHE)
def train_on_task(kind: str, data: Path, limit: int | None, params: RobustifyEvalParams, seed: int,
                  progress: bool = False) -> dict[str, Any]:
    """Train one standard classifier per learning rate of the sweep on <data>/train; keep the one with the
    best accuracy on the original val split (<data>/val); return its directory and the sweep."""
    train_set = open_dataset(Path(data) / "train")
    train = subset(load_in_memory(train_set, progress=False), limit)
    val = load_in_memory(params.val, progress=False)
    sweep, best = [], None
    for lr in learning_rates(kind, params):
        recipe = params.train.model_copy(update={"data": Path(data), "lr": lr, "seed": seed, "limit": limit})
        model, description = fit(train, val, recipe, progress=progress)
        accuracy = description["val"]["accuracy"]
        sweep.append({"lr": lr, "val_accuracy": accuracy, "train_seconds": description["train_seconds"]})
        if best is None or accuracy > best[0]:
            best = (accuracy, lr, model, description)
    _, lr, model, description = best
    out = Path(params.models) / kind / f"seed{seed}"
    sidecar = {**description, "data": {"train_manifest_sha256": train_set.card["manifest"]["sha256"],
                                       "kind": kind}, "lr_sweep": sweep,
               "built_by": {"stage": f"evaluate_{kind}", **code_version()}}
    with atomic_directory(out) as staging:
        save_checkpoint(staging / MODEL_FILE, model, sidecar)
    return {"model": str(out), "seed": seed, "lr": lr, "lr_sweep": sweep}


@task(name="evaluate-on", cache_policy=NO_CACHE)
def evaluate_on_task(trained: dict[str, Any], params: RobustifyEvalParams, progress: bool = False
                     ) -> dict[str, Any]:
    """Clean accuracy on the whole original test split; robust accuracy under each attack (first `limit`)."""
    device = resolve_device(params.device)
    model, _ = load_checkpoint(Path(trained["model"]) / MODEL_FILE, device)
    test = load_in_memory(params.test, progress=False)
    report = evaluate_model(model, test, params.attacks, limit=params.limit, batch_size=params.batch_size,
                            seed=trained["seed"], progress=progress)
    return {**trained, "clean_accuracy": report["clean"]["accuracy"],
            "robust": {attack_name(a): a["accuracy"] for a in report["robust"]}, "details": report}


def attack_name(attack: dict[str, Any]) -> str:
    return f"{attack['threat']}_{attack['eps']:g}"


def mean_std(values: list[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(values) > 1 else 0.0, "n": len(values)}


@task(name="write-evaluation-of", cache_policy=NO_CACHE)
def write_kind_results(kind: str, data: Path, runs: list[dict[str, Any]], params: RobustifyEvalParams) -> Path:
    """<out>/<kind>.json: per-seed runs and mean +- std of clean and robust accuracy."""
    attacks = list(runs[0]["robust"])
    result = {
        "kind": kind, "data": str(data), "seeds": [r["seed"] for r in runs],
        "clean_accuracy": mean_std([r["clean_accuracy"] for r in runs]),
        "robust": {name: mean_std([r["robust"][name] for r in runs]) for name in attacks},
        "attacks": [a.model_dump() for a in params.attacks], "attacked_images": params.limit,
        "runs": [{k: v for k, v in r.items() if k != "details"} for r in runs],
        "details": [r["details"] for r in runs],
        "built_by": {"stage": f"evaluate_{kind}", **code_version()},
    }
    path = Path(params.out) / f"{kind}.json"
    write_json_atomic(path, result)
    return path


# ------------------------------------------------------------------------------------------------------ report

GRID_SIZE = 8  # images per row of the report's grids


def build_summary(params: BuildParams) -> dict[str, Any]:
    """How one built dataset was made, from its card and manifest (for the report's table)."""
    dataset = open_dataset(Path(params.out) / "train")
    manifest = read_manifest(dataset.manifest_path)
    column = "final_distance" if params.kind in INVERSION_KINDS else "final_loss"
    final = torch.tensor(manifest.column(column).to_pylist(), dtype=torch.float64)
    what = "relative feature distance" if params.kind in INVERSION_KINDS else "cross-entropy to target"
    return {"num_samples": len(dataset), "steps": params.steps, "step_size": params.step_size,
            "schedule": params.schedule, "eps": params.eps,
            "model": str(params.model), "final": f"{what}: median {final.median():.3f}",
            "manifest_sha256": dataset.card["manifest"]["sha256"]}


def by_origin(dataset_dir: Path, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(images, labels, start keys) of a built dataset for the given origin keys."""
    data = load_in_memory(Path(dataset_dir) / "train", progress=False)
    manifest = read_manifest(Path(dataset_dir) / "train" / "manifest.parquet")
    origin = manifest.column("origin_key").to_pylist()
    starts = manifest.column("start_key").to_pylist()
    where = {key: i for i, key in enumerate(origin)}
    index = [where[key] for key in keys]
    return data.images[index], data.labels[index], [starts[i] for i in index]


@task(name="robustify-report", cache_policy=NO_CACHE)
def robustify_report_task(builds: dict[str, BuildParams], params: RobustifyEvalParams, source: Path,
                          robust_model: Path, standard_model: Path) -> dict[str, Any]:
    """Table (from <out>/<kind>.json), image grids and saliency maps -> report.md/html, metrics.json."""
    results = {kind: read_json(Path(params.out) / f"{kind}.json")
               for kind in ("original", *builds) if (Path(params.out) / f"{kind}.json").exists()}
    if not results:
        raise DataError(f"no results under {params.out}: run `robustdata evaluate-built` first", path=params.out)
    summaries = {kind: build_summary(p) for kind, p in builds.items() if (Path(p.out) / "train").exists()}
    original = load_in_memory(Path(source) / "train", progress=False)
    figures = {}
    keys = original.keys[:GRID_SIZE]
    x, y = original.images[:GRID_SIZE], original.labels[:GRID_SIZE]
    names = original.classes
    inversions = [k for k in ("robust", "nonrobust") if k in summaries]
    if inversions:
        rows = [("original x", x, [f"label {names[i]}" for i in y.tolist()])]
        built = {k: by_origin(builds[k].out, keys) for k in inversions}
        if "robust" in built and built["robust"][2][0] is not None:
            start_keys = built["robust"][2]
            where = {key: i for i, key in enumerate(original.keys)}
            starts = torch.stack([original.images[where[k]] for k in start_keys])
            rows.append(("D_R start x0", starts, [f"label {names[int(original.labels[where[k]])]}" for k in start_keys]))
        for kind in inversions:
            images, labels, _ = built[kind]
            rows.append((KIND_NAMES[kind], images, [f"label {names[i]}" for i in labels.tolist()]))
        figures["Originals, the start images of D_R, and their D_R and D_NR versions (label of x kept)"] = \
            image_rows_figure(rows, "feature inversion: x_r matches x in the model's representation")
    targeted = [k for k in ("det", "rand") if k in summaries]
    if targeted:
        rows = [("original", x, [f"label {names[i]}" for i in y.tolist()])]
        for kind in targeted:
            images, labels, _ = by_origin(builds[kind].out, keys)
            rows.append((KIND_NAMES[kind], images,
                         [f"{names[a]} -> {names[b]}" for a, b in zip(y.tolist(), labels.tolist())]))
        figures["D_det and D_rand: the same images pushed toward a new label, and relabelled (original -> new)"] = \
            image_rows_figure(rows, "targeted L2 perturbations of a standard model, relabelled")
    device = resolve_device(params.device)
    gradients = {}
    for name, path in (("robust model", robust_model), ("standard model", standard_model)):
        if (Path(path) / MODEL_FILE).exists():
            model, _ = load_checkpoint(Path(path) / MODEL_FILE, device)
            gradients[name] = input_gradients(model, x.to(device).float().div(255.0), y.to(device)).cpu()
    if gradients:
        figures["Input-gradient saliency: the robust model's gradients look like digits, the standard "
                "model's like noise"] = saliency_figure(x, gradients, [f"label {names[i]}" for i in y.tolist()])
    paths = write_report(Path(params.out), results, summaries, figures)
    return {"out": str(params.out), "metrics": gate_metrics(results),
            "markdown": render_markdown(document(results, summaries, {})), "report": str(paths["html"])}

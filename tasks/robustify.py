"""Build robustified / non-robust-feature datasets shard by shard; train and evaluate classifiers on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from robustdata.config import BuildParams, RobustifyEvalParams
from robustdata.data.manifest import open_dataset
from robustdata.data.memory import load_in_memory
from robustdata.errors import DataError
from robustdata.io import atomic_directory, code_version, read_json, write_json_atomic
from robustdata.report.robustify import gate_metrics, report_markdown, write_report
from robustdata.robustify.experiment import best_of_sweep, kind_results, run_result
from robustdata.robustify.recipe import build_plan, build_shard_samples, card_fields, set_threads
from robustdata.robustify.sharded import finish, prepare, shard_seed, write_built_shard
from robustdata.robustify.showcase import build_summary, showcase_figures
from robustdata.train.training import (MODEL_FILE, evaluate_model, generator_for, load_model, resolve_device,
                                       save_checkpoint, subset)


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
    model, _ = load_model(params.model, device)
    data = subset(load_in_memory(Path(params.data) / "train", progress=False), plan.num_samples)
    shard = torch.tensor(list(plan.shard_range(index)))
    samples, summary = build_shard_samples(params, model, data, shard,
                                           generator_for(shard_seed(params.seed, index), device))
    write_built_shard(plan, index, samples)
    return {"shard": index, **summary}


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
    written = finish(plan, card_fields(params, plan, source, model_sidecar),
                     extra_dirs={"val": Path(params.data) / "val"})
    return {"out": str(plan.out), "num_samples": written["num_samples"],
            "counts_per_class": written["counts_per_class"]}


# ------------------------------------------------------------------------------------ train and evaluate on D_*


@task(name="train-on", cache_policy=NO_CACHE)
def train_on_task(kind: str, data: Path, limit: int | None, params: RobustifyEvalParams, seed: int,
                  progress: bool = False) -> dict[str, Any]:
    """Train one standard classifier per learning rate of the sweep on <data>/train; keep the one with the
    best accuracy on the original val split (<data>/val); return its directory and the sweep."""
    train_set = open_dataset(Path(data) / "train")
    train = subset(load_in_memory(train_set, progress=False), limit)
    val = load_in_memory(params.val, progress=False)
    model, description, lr, sweep = best_of_sweep(kind, data, limit, train, val, params, seed, progress)
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
    model, _ = load_model(trained["model"], resolve_device(params.device))
    test = load_in_memory(params.test, progress=False)
    report = evaluate_model(model, test, params.attacks, limit=params.limit, batch_size=params.batch_size,
                            seed=trained["seed"], progress=progress)
    return run_result(trained, report)


@task(name="write-evaluation-of", cache_policy=NO_CACHE)
def write_kind_results(kind: str, data: Path, runs: list[dict[str, Any]], params: RobustifyEvalParams) -> Path:
    """<out>/<kind>.json: per-seed runs and mean +- std of clean and robust accuracy."""
    path = Path(params.out) / f"{kind}.json"
    write_json_atomic(path, kind_results(kind, data, runs, params))
    return path


# ------------------------------------------------------------------------------------------------------ report


@task(name="robustify-report", cache_policy=NO_CACHE)
def robustify_report_task(builds: dict[str, BuildParams], params: RobustifyEvalParams, source: Path,
                          robust_model: Path, standard_model: Path) -> dict[str, Any]:
    """Table (from <out>/<kind>.json), image grids and saliency maps -> report.md/html, metrics.json."""
    results = {kind: read_json(Path(params.out) / f"{kind}.json")
               for kind in ("original", *builds) if (Path(params.out) / f"{kind}.json").exists()}
    if not results:
        raise DataError(f"no results under {params.out}: run `robustdata evaluate-built` first", path=params.out)
    summaries = {kind: build_summary(p) for kind, p in builds.items() if (Path(p.out) / "train").exists()}
    device = resolve_device(params.device)
    models = {name: load_model(path, device)[0] for name, path in (("robust model", robust_model),
                                                                   ("standard model", standard_model))
              if (Path(path) / MODEL_FILE).exists()}
    original = load_in_memory(Path(source) / "train", progress=False)
    figures = showcase_figures(original, builds, list(summaries), models)
    paths = write_report(Path(params.out), results, summaries, figures)
    return {"out": str(params.out), "metrics": gate_metrics(results),
            "markdown": report_markdown(results, summaries), "report": str(paths["html"])}

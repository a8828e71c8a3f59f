"""From a build's params to its shards: the plan and fingerprint of a build, each shard's images with
their lineage, and the card of the finished dataset. The optimisation itself is in builders.py, the
resumable shard bookkeeping in sharded.py."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustdata.config import INVERSION_KINDS, BuildParams
from robustdata.data.derived import module_sha256
from robustdata.data.manifest import Dataset, open_dataset
from robustdata.data.memory import InMemoryDataset
from robustdata.data.shards import Sample, quantize
from robustdata.errors import DataError, RobustDataError
from robustdata.io import code_version, sha256_file
from robustdata.robustify.builders import BuiltBatch, StepConfig, build_batch
from robustdata.robustify.sharded import BuildPlan
from robustdata.train.training import MODEL_FILE

# the library modules whose code decides a build's bytes (recorded in the plan's fingerprint and the card)
BUILD_MODULES = ("robustify/builders.py", "robustify/recipe.py", "robustify/sharded.py", "train/attacks.py",
                 "train/models.py")


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


def samples_of(kind: str, data: InMemoryDataset, index: torch.Tensor, built: BuiltBatch, images: torch.Tensor
               ) -> list[Sample]:
    """One Sample per built image (uint8 HWC) with its lineage."""
    hwc = images.permute(0, 2, 3, 1).numpy()
    out = []
    for row, i in enumerate(index.tolist()):
        info: dict[str, Any] = {"origin_key": data.keys[i], "first_origin": data.first_origins[i],
                                "source_label": int(data.labels[i]), "kind": kind}
        if built.start_index is not None:
            info["start_key"] = data.keys[int(built.start_index[row])] if built.start_index[row] >= 0 else None
            info["final_distance"] = float(built.final_distance[row])
        else:
            info["target_label"] = int(built.labels[row])
            info["final_loss"] = float(built.final_loss[row])
        out.append(Sample(data.keys[i], hwc[row], int(built.labels[row]),
                          {k: v for k, v in info.items() if v is not None}))
    return out


def build_shard_samples(params: BuildParams, model: nn.Module, data: InMemoryDataset, shard: torch.Tensor,
                        generator: torch.Generator) -> tuple[list[Sample], dict[str, Any]]:
    """The built samples of the training indices `shard` (batch by batch), and a summary of the work."""
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
    summary: dict[str, Any] = {"samples": len(samples), "seconds": seconds,
                               "image_steps_per_second": len(samples) * params.steps / max(seconds, 1e-9)}
    if distances:
        summary["mean_final_distance"] = float(torch.cat(distances).mean())
    if losses:
        summary["mean_final_loss"] = float(torch.cat(losses).mean())
    return samples, summary


def card_fields(params: BuildParams, plan: BuildPlan, source: Dataset, model_sidecar: dict[str, Any]
                ) -> dict[str, Any]:
    """What the finished dataset's card says of itself beside its counts and hashes (sharded.finish)."""
    return {
        "name": f"{source.card['name']}-{params.kind}",
        "classes": source.classes,
        "image_shape": source.card["image_shape"],
        "inputs": {"source": str(source.root), "manifest_sha256": source.card["manifest"]["sha256"],
                   "model": str(params.model), "model_sha256": plan.fingerprint["model_sha256"],
                   "model_trained_adversarially": model_sidecar["params"].get("adversarial") is not None},
        "params": content_params(params),
        "built_by": {"stage": f"build_{params.kind}", **code_version(),
                     "modules_sha256": plan.fingerprint["modules_sha256"], "threads": params.threads},
    }

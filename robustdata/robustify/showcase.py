"""What the robustify report shows of the built datasets: how each was built (from its card and
manifest), and the figures: originals beside their D_R / D_NR / D_det / D_rand versions, and the
input-gradient saliency of the robust and the standard model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from robustdata.config import INVERSION_KINDS, BuildParams
from robustdata.data.manifest import open_dataset, read_manifest
from robustdata.data.memory import InMemoryDataset, load_in_memory
from robustdata.report.robustify import KIND_NAMES, image_rows_figure, saliency_figure
from robustdata.robustify.builders import input_gradients

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


def inversion_figure(original: InMemoryDataset, builds: dict[str, BuildParams], kinds: list[str]) -> Figure:
    """Originals x, the start images x0 of D_R, and the D_R / D_NR images built from x."""
    keys, names = original.keys[:GRID_SIZE], original.classes
    x, y = original.images[:GRID_SIZE], original.labels[:GRID_SIZE]
    rows = [("original x", x, [f"label {names[i]}" for i in y.tolist()])]
    built = {k: by_origin(builds[k].out, keys) for k in kinds}
    if "robust" in built and built["robust"][2][0] is not None:
        start_keys = built["robust"][2]
        where = {key: i for i, key in enumerate(original.keys)}
        starts = torch.stack([original.images[where[k]] for k in start_keys])
        rows.append(("D_R start x0", starts, [f"label {names[int(original.labels[where[k]])]}" for k in start_keys]))
    for kind in kinds:
        images, labels, _ = built[kind]
        rows.append((KIND_NAMES[kind], images, [f"label {names[i]}" for i in labels.tolist()]))
    return image_rows_figure(rows, "feature inversion: x_r matches x in the model's representation")


def targeted_figure(original: InMemoryDataset, builds: dict[str, BuildParams], kinds: list[str]) -> Figure:
    """Originals beside their D_det / D_rand versions, captioned original label -> new label."""
    keys, names = original.keys[:GRID_SIZE], original.classes
    x, y = original.images[:GRID_SIZE], original.labels[:GRID_SIZE]
    rows = [("original", x, [f"label {names[i]}" for i in y.tolist()])]
    for kind in kinds:
        images, labels, _ = by_origin(builds[kind].out, keys)
        rows.append((KIND_NAMES[kind], images, [f"{names[a]} -> {names[b]}" for a, b in zip(y.tolist(), labels.tolist())]))
    return image_rows_figure(rows, "targeted L2 perturbations of a standard model, relabelled")


def showcase_figures(original: InMemoryDataset, builds: dict[str, BuildParams], built_kinds: list[str],
                     models: dict[str, nn.Module]) -> dict[str, Figure]:
    """The report's figures, titled, for the kinds built so far and the models given (name -> model)."""
    figures = {}
    inversions = [k for k in ("robust", "nonrobust") if k in built_kinds]
    if inversions:
        figures["Originals, the start images of D_R, and their D_R and D_NR versions (label of x kept)"] = \
            inversion_figure(original, builds, inversions)
    targeted = [k for k in ("det", "rand") if k in built_kinds]
    if targeted:
        figures["D_det and D_rand: the same images pushed toward a new label, and relabelled (original -> new)"] = \
            targeted_figure(original, builds, targeted)
    x, y = original.images[:GRID_SIZE], original.labels[:GRID_SIZE]
    gradients = {}
    for name, model in models.items():
        device = next(model.parameters()).device
        gradients[name] = input_gradients(model, x.to(device).float().div(255.0), y.to(device)).cpu()
    if gradients:
        figures["Input-gradient saliency: the robust model's gradients look like digits, the standard "
                "model's like noise"] = saliency_figure(x, gradients, [f"label {original.classes[i]}" for i in y.tolist()])
    return figures

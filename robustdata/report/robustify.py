"""The robustification report: the Ilyas et al. table, image grids and saliency maps.

Same conventions as robustdata.report.documents: matplotlib's object API (headless, thread
safe), figures first and the documents last, every file atomic, same inputs
give the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

import numpy as np

from robustdata.io import write_json_atomic
from robustdata.report.formats import MISSING, mean_std
from robustdata.report.render import DocImage, DocTable, Document, render_markdown, write_documents

if TYPE_CHECKING:  # the figures import them when drawn: the results page reads tables only, and starts fast
    import torch
    from matplotlib.figure import Figure

FIGURES_DIR = "figures"
PLOTS_DIR = "plots"  # DVC plots data: robust accuracy against eps, one file per threat model
KIND_ORDER = ("original", "robust", "nonrobust", "rand", "det")
KIND_NAMES = {"original": "D", "robust": "D_R", "nonrobust": "D_NR", "rand": "D_rand", "det": "D_det"}
# Ilyas et al. 2019 on CIFAR-10 (ResNet-50), as DESIGN.md section 4 quotes them: clean accuracy on the
# original test set, and robust accuracy under L2 eps 0.25 (PGD-7) where the paper reports it.
PAPER_CIFAR10 = {"robust": ("84%", "48%"), "nonrobust": ("88%", "0.8%"), "rand": ("63%", MISSING),
                 "det": ("44%", MISSING)}


def kinds_and_attacks(results: dict[str, dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The datasets present, in the paper's order, and the attacks they were evaluated under ("linf_0.3")."""
    kinds = [k for k in KIND_ORDER if k in results]
    return kinds, list(results[kinds[0]]["robust"]) if kinds else []


def attack_title(name: str) -> str:
    return name.replace("_", " eps ")


def accuracy_cells(result: dict[str, Any], attacks: list[str]) -> list[str]:
    """Clean, then robust accuracy under each attack: mean +- std over seeds, in percent."""
    return [mean_std(result["clean_accuracy"])] + [mean_std(result["robust"][a]) for a in attacks]


def results_table(results: dict[str, dict[str, Any]]) -> DocTable:
    """One row per dataset: clean and robust accuracy (mean +- std over seeds), the paper's numbers beside."""
    kinds, attacks = kinds_and_attacks(results)
    header = (["trained on", "seeds", "lr", "clean %"] + [f"{attack_title(name)} %" for name in attacks]
              + ["paper CIFAR-10 clean", "paper robust (L2 0.25)"])
    rows = []
    for kind in kinds:
        r = results[kind]
        lrs = sorted({run["lr"] for run in r["runs"]})
        paper = PAPER_CIFAR10.get(kind, (MISSING, MISSING))
        rows.append([KIND_NAMES[kind], str(len(r["runs"])), ", ".join(f"{lr:g}" for lr in lrs)]
                    + accuracy_cells(r, attacks) + list(paper))
    return DocTable(header, rows, [k == "robust" for k in kinds])


def headline(results: dict[str, dict[str, Any]]) -> list[str]:
    """The comparisons the Ilyas et al. experiment is about, in words."""
    lines = []
    base = results.get("original")
    for kind in ("robust", "nonrobust"):
        if base and kind in results:
            deltas = ", ".join(
                f"{attack_title(name)} {100 * (results[kind]['robust'][name]['mean'] - s['mean']):+.1f} pts"
                for name, s in base["robust"].items())
            lines.append(f"{KIND_NAMES[kind]} vs D, robust accuracy: {deltas}")
    for kind in ("rand", "det"):
        if kind in results:
            accuracy = mean_std(results[kind]["clean_accuracy"], unit="%")
            lines.append(f"{KIND_NAMES[kind]}: {accuracy} on the original test set (chance 10%): non-robust "
                         "features alone generalise")
    return lines


def gate_metrics(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Means only, flat per dataset: what `dvc metrics show` prints and a CI job gates on."""
    return {kind: {"clean_accuracy": r["clean_accuracy"]["mean"],
                   **{f"robust_{name}": s["mean"] for name, s in r["robust"].items()}}
            for kind, r in results.items()}


def plot_curves(results: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Robust accuracy against eps, one record per eps (0 = clean) with a column per dataset, per threat model:
    the files DVC plots (`dvc plots show`, `dvc plots diff`) draw as one line per dataset."""
    kinds, attacks = kinds_and_attacks(results)
    curves: dict[str, list[dict[str, float]]] = {}
    for threat in dict.fromkeys(name.split("_")[0] for name in attacks):
        points = [(0.0, {KIND_NAMES[k]: results[k]["clean_accuracy"]["mean"] for k in kinds})]
        points += [(float(name.split("_", 1)[1]), {KIND_NAMES[k]: results[k]["robust"][name]["mean"] for k in kinds})
                   for name in attacks if name.split("_")[0] == threat]
        curves[threat] = [{"eps": eps, **row} for eps, row in points]
    return curves


# ------------------------------------------------------------------------------------------------- figures


def _gray(ax, image: np.ndarray, caption: str, cmap: str = "gray", vmin: float = 0.0, vmax: float = 1.0) -> None:
    ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(caption, fontsize=7)


def _hwc(images: torch.Tensor) -> np.ndarray:
    """uint8 or float (N, C, H, W) -> float (N, H, W[, C]) in [0, 1] for imshow."""
    array = images.float().div(255.0) if not images.is_floating_point() else images.float()
    array = array.permute(0, 2, 3, 1).cpu().numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def image_rows_figure(rows: list[tuple[str, torch.Tensor, list[str]]], title: str) -> Figure:
    """A grid: one row per (row title, images (n, C, H, W), captions)."""
    n = max(len(images) for _, images, _ in rows)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1.1 * n + 1.2, 1.35 * len(rows) + 0.4))
    axes = figure.subplots(len(rows), n, squeeze=False)
    for r, (name, images, captions) in enumerate(rows):
        pictures = _hwc(images)
        for c in range(n):
            ax = axes[r][c]
            if c < len(pictures):
                _gray(ax, pictures[c], captions[c])
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(name, fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def saliency_figure(images: torch.Tensor, gradients: dict[str, torch.Tensor], labels: list[str]) -> Figure:
    """Images, then each model's input gradient per image (diverging colours, scaled per image)."""
    n = len(images)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1.1 * n + 1.2, 1.35 * (1 + len(gradients)) + 0.4))
    axes = figure.subplots(1 + len(gradients), n, squeeze=False)
    pictures = _hwc(images)
    for c in range(n):
        _gray(axes[0][c], pictures[c], labels[c])
    axes[0][0].set_ylabel("image", fontsize=8)
    for r, (name, grad) in enumerate(gradients.items(), start=1):
        maps = grad.float().sum(1).cpu().numpy()  # over channels: (n, H, W)
        for c in range(n):
            scale = float(np.abs(maps[c]).max()) or 1.0
            _gray(axes[r][c], maps[c] / scale, "", cmap="RdBu_r", vmin=-1.0, vmax=1.0)
        axes[r][0].set_ylabel(name, fontsize=8)
    figure.suptitle("input gradients (saliency) of the loss for the true label", fontsize=10)
    figure.tight_layout()
    return figure


# ------------------------------------------------------------------------------------------------- documents


_BUILD_FIELDS = ("num_samples", "steps", "step_size", "schedule", "eps", "model", "final")


def document(results: dict[str, dict[str, Any]], builds: dict[str, dict[str, Any]],
             figures: dict[str, str]) -> Document:
    sections: Document = [("Robust and non-robust features (Ilyas et al. 2019)", [headline(results)])]
    sections.append(("Standard classifiers trained on each dataset, evaluated on the original test set",
                     [results_table(results),
                      ["Robust accuracy: PGD with random restarts on the first test images (see the JSON for "
                       "steps, restarts and n); mean ± std over seeds (n = 1: a single seed, no spread). The "
                       "paper's numbers are CIFAR-10 with a ResNet-50, for reference only: MNIST standard models "
                       "are already fairly robust at small eps, so the gap shows at Linf 0.2 and 0.3."]]))
    if builds:
        rows = [[KIND_NAMES[kind]] + [str(b.get(name, MISSING)) for name in _BUILD_FIELDS]
                for kind, b in builds.items()]
        sections.append(("How each dataset was built", [DocTable(
            ["dataset", "samples", "steps", "step size", "schedule", "eps (L2)", "model", "final distance / loss"],
            rows)]))
    if figures:
        sections.append(("Figures", [DocImage(title, src) for title, src in figures.items()]))
    return sections


def report_markdown(results: dict[str, dict[str, Any]], builds: dict[str, dict[str, Any]]) -> str:
    """The report as markdown without its figures (for a terminal)."""
    return render_markdown(document(results, builds, {}))


def write_report(out_dir: Path, results: dict[str, dict[str, Any]], builds: dict[str, dict[str, Any]],
                 figures: dict[str, Figure]) -> dict[str, Path]:
    """figures/*.png, then metrics.json, summary.json, report.md and report.html under out_dir."""
    from robustdata.report.figures import write_png  # torch and matplotlib: only where figures are written

    out_dir = Path(out_dir)
    paths: dict[str, Path] = {}
    sources: dict[str, str] = {}
    for index, (title, figure) in enumerate(figures.items()):
        relative = f"{FIGURES_DIR}/figure_{index}.png"
        write_png(out_dir / relative, figure)
        sources[title] = relative
        paths[title] = out_dir / relative
    write_json_atomic(out_dir / "metrics.json", gate_metrics(results))
    for threat, curve in plot_curves(results).items():
        write_json_atomic(out_dir / PLOTS_DIR / f"{threat}.json", curve)
    write_json_atomic(out_dir / "summary.json", {"results": {k: {kk: vv for kk, vv in v.items() if kk != "details"}
                                                             for k, v in results.items()}, "builds": builds})
    paths.update(write_documents(out_dir, "report", document(results, builds, sources)))
    return paths


# ------------------------------------------------------------------------------------------------- table rows


def run_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per trained classifier (seed, lr, clean and `robust_<attack>` accuracy), for a table artifact."""
    return [{"seed": r["seed"], "lr": r["lr"], "model": r["model"], "clean_accuracy": r["clean_accuracy"],
             **{f"robust_{name}": value for name, value in r["robust"].items()}} for r in runs]


def metric_rows(metrics: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """gate_metrics() as one row per dataset, in the paper's order, for a table artifact."""
    return [{"dataset": KIND_NAMES[kind], **metrics[kind]} for kind in KIND_ORDER if kind in metrics]

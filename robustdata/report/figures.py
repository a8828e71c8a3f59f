"""Headless figures of the audit report, and the PNG writer every report uses.

matplotlib's object API (`matplotlib.figure.Figure`, no pyplot): no global figure registry and no backend
to select, so it is safe in worker threads and on machines without a display. Same inputs give the same
PNG bytes.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import NullFormatter

from robustdata.io import write_bytes_atomic

TOP_SUSPICIOUS = 32  # images per "most suspicious" grid: 4 rows of 8


@dataclass(frozen=True)
class ScoreColumns:
    """The score table's columns the figures need, as numpy arrays of length N."""

    label: np.ndarray  # int
    score: np.ndarray  # float64, the removal method's score
    flagged: np.ndarray  # bool, the removal method's flags
    poison: np.ndarray | None  # bool ground truth, None when unknown


_DPI = 100
_CLEAN, _POISON = "tab:blue", "tab:red"
_BORDER_CLEAN, _BORDER_POISON = "#2ca02c", "#d62728"


def write_png(path: Path, figure: Figure) -> None:
    buffer = io.BytesIO()
    # Without the "Software" entry (the matplotlib version) the bytes depend only on what is drawn,
    # so DVC sees a change only when the report's content changes.
    figure.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    write_bytes_atomic(path, buffer.getvalue())


def _log_scores(score: np.ndarray) -> np.ndarray:
    """log10(score - min + eps): suspicion scores are heavy-tailed, and on a linear axis the clean bulk
    collapses into one bin; eps (1e-3 of the range) keeps the minimum finite and bounds the left tail."""
    low, span = score.min(), score.max() - score.min()
    return np.log10(score - low + (1e-3 * span if span > 0 else 1.0))


def histogram_figure(summary: dict, columns: ScoreColumns) -> Figure:
    """One panel per class: the removal method's score distribution (log counts), clean vs poison when known,
    and a dashed line at the class's flag threshold (its lowest flagged score)."""
    classes = summary["classes"]
    x = _log_scores(columns.score)
    # Shared bins and x-axis, so panels compare at a glance.
    edges = np.linspace(x.min(), max(x.max(), x.min() + 1e-9), 41)
    ncols = max(1, min(5, len(classes)))
    nrows = max(1, math.ceil(len(classes) / ncols))
    figure = Figure(figsize=(2.8 * ncols, 2.2 * nrows + 0.8), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False, sharex=True)
    for ax, c in zip(axes.flat, classes):
        _histogram_panel(ax, c, columns, x, edges)
    for ax in axes.flat[len(classes):]:
        ax.set_axis_off()
    method = summary["removal_method"]
    figure.suptitle(f"{method} score by class (red titles: classes judged poisoned)")
    figure.supxlabel(f"log10({method} score − min + ε)")
    figure.supylabel("samples (log scale)")
    handles = [Patch(color=_CLEAN, alpha=0.6, label="clean" if columns.poison is not None else "all samples"),
               Line2D([], [], color="black", linestyle="--", label="flag threshold")]
    if columns.poison is not None:
        handles.insert(1, Patch(color=_POISON, alpha=0.6, label="poison"))
    figure.legend(handles=handles, loc="outside right upper", frameon=False)
    return figure


def _histogram_panel(ax, c: dict, columns: ScoreColumns, x: np.ndarray, edges: np.ndarray) -> None:
    rows = columns.label == c["label"]
    if columns.poison is None:
        groups = [(x[rows], _CLEAN)]
    else:
        groups = [(x[rows & ~columns.poison], _CLEAN), (x[rows & columns.poison], _POISON)]
    peak = 1
    for values, colour in groups:
        counts, _ = np.histogram(values, bins=edges)
        peak = max(peak, int(counts.max()))
        # Baseline 0.5 (under one sample), not 0, which a log axis cannot draw.
        ax.stairs(counts, edges, fill=True, color=colour, alpha=0.6, baseline=0.5)
    ax.set_yscale("log")
    # At least one labelled decade, and no minor-tick labels: small classes would otherwise get cluttered axes.
    ax.set_ylim(0.5, max(10, 2 * peak))
    ax.yaxis.set_minor_formatter(NullFormatter())
    flagged = x[rows & columns.flagged]
    if flagged.size:
        ax.axvline(flagged.min(), color="black", linestyle="--", linewidth=1)
    # parse_math=False: class names are user text, and a "$" in one must not be read as (broken) LaTeX.
    ax.set_title(f"{c['name']}  (n={int(rows.sum())}, flagged {int(flagged.size)})", fontsize=9, parse_math=False,
                 color=_POISON if c["poisoned"] else "black", fontweight="bold" if c["poisoned"] else "normal")
    ax.tick_params(labelsize=7)


def suspicious_figure(c: dict, columns: ScoreColumns, images: torch.Tensor, method: str) -> Figure:
    """The class's TOP_SUSPICIOUS highest-scoring images, ranked; borders mark ground truth when known."""
    members = np.flatnonzero(columns.label == c["label"])
    # Stable sort: tied scores keep row order, so the grid (and its bytes) are reproducible.
    top = members[np.argsort(-columns.score[members], kind="stable")[:TOP_SUSPICIOUS]]
    ncols = max(1, min(8, len(top)))
    nrows = max(1, math.ceil(len(top) / ncols))
    figure = Figure(figsize=(1.2 * ncols, 1.3 * nrows + 0.7), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False)
    tiles = images[torch.from_numpy(top)].permute(0, 2, 3, 1).cpu().numpy()  # (k, H, W, C)
    for rank, (ax, row, tile) in enumerate(zip(axes.flat, top, tiles), start=1):
        _image_tile(ax, tile, f"#{rank}", flagged=bool(columns.flagged[row]),
                    poison=None if columns.poison is None else bool(columns.poison[row]))
    for ax in axes.flat[len(top):]:
        ax.set_axis_off()
    key = "grey rank: not flagged"
    if columns.poison is not None:
        key = "red border: poison, green: clean; " + key
    figure.suptitle(f"class {c['name']}: top {len(top)} of {len(members)} by {method} score\n{key}", fontsize=9,
                    parse_math=False)
    return figure


def _image_tile(ax, tile: np.ndarray, caption: str, flagged: bool, poison: bool | None) -> None:
    if tile.shape[-1] == 1:
        ax.imshow(tile[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(tile, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(caption, fontsize=7, pad=2, color="black" if flagged else "grey")
    if poison is not None:
        for spine in ax.spines.values():
            spine.set_edgecolor(_BORDER_POISON if poison else _BORDER_CLEAN)
            spine.set_linewidth(3)


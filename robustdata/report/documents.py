"""Reports: markdown/HTML documents and headless plots from JSON results and audit scores.

Plots use matplotlib's object API (`matplotlib.figure.Figure`, no pyplot): no
global figure registry and no backend to select, so it is safe in worker
threads and on machines without a display. Every file is written atomically
(figures first, the documents last), so a report.md that exists is complete and
its figures exist too.
"""

from __future__ import annotations

import html
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import NullFormatter

from robustdata.errors import RobustDataError
from robustdata.io import write_bytes_atomic


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def evaluation_markdown(results: list[dict[str, Any]]) -> str:
    """One row per model: clean accuracy, then robust accuracy per attack."""
    attacks = [(a["threat"], a["eps"], a["steps"], a["restarts"]) for a in results[0]["robust"]] if results else []
    header = ["model", "arch", "adversarially trained", "clean accuracy"] + [
        f"{t} eps {e:g} (PGD-{s} x{r})" for t, e, s, r in attacks]
    lines = ["# Evaluation", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [Path(r["model"]).name, r["arch"], "yes" if r["trained_adversarially"] else "no",
                 percent(r["clean"]["accuracy"])] + [f"{percent(a['accuracy'])} (n={a['n']})" for a in r["robust"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Robust accuracy is measured on the first n test images; clean accuracy on all of them.", ""]
    classes = len(results[0]["clean"]["per_class"]) if results else 0
    lines += ["## Per-class clean accuracy", "", "| model | " + " | ".join(str(c) for c in range(classes)) + " |",
              "|" + "---|" * (classes + 1)]
    for r in results:
        lines.append(f"| {Path(r['model']).name} | " + " | ".join(percent(v) for v in r["clean"]["per_class"]) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Audit report: public entry points

FIGURES_DIR = "figures"
TOP_SUSPICIOUS = 32  # images per "most suspicious" grid: 4 rows of 8
MISSING = "–"  # shown for metrics that are undefined (e.g. AUROC of a class without poisons)


def write_audit_report(out_dir: Path, summary: dict, scores: pa.Table, images: torch.Tensor,
                       loop: dict | None = None, classes: list[str] | None = None) -> dict[str, Path]:
    """Write out_dir/report.md, out_dir/report.html and out_dir/figures/*.png; return their paths.

    `scores` has one row per training sample, aligned with `images` (N, C, H, W) uint8 with C in {1, 3};
    `classes`, when given, names label i `classes[i]` (overriding the names in `summary`). The returned
    dict maps "markdown", "html", "score_histograms" and "suspicious_<label>" to the written files.
    Same inputs give byte-identical files.
    """
    out_dir = Path(out_dir)
    summary = _with_class_names(summary, classes)
    columns = _audit_columns(summary, scores, images)
    paths: dict[str, Path] = {}
    figures: dict[str, str] = {}  # title -> path relative to out_dir, for the documents

    def save(name: str, title: str, figure: Figure) -> None:
        relative = f"{FIGURES_DIR}/{name}.png"
        paths[name] = out_dir / relative
        figures[title] = relative
        write_png(paths[name], figure)

    method = summary["removal_method"]
    save("score_histograms", f"{method} score per class", _histogram_figure(summary, columns))
    for c in _grid_classes(summary):
        save(f"suspicious_{c['label']}", f"Most suspicious images of class {c['name']} (label {c['label']})",
             _suspicious_figure(c, columns, images, method))
    # The documents last: a report that exists never links to a figure that does not.
    paths["html"], paths["markdown"] = out_dir / "report.html", out_dir / "report.md"
    write_bytes_atomic(paths["html"], audit_html(summary, loop, figures).encode())
    write_bytes_atomic(paths["markdown"], audit_markdown(summary, loop, figures).encode())
    _remove_stale_grids(out_dir / FIGURES_DIR, keep=set(paths.values()))
    return paths


def audit_markdown(summary: dict, loop: dict | None = None, figures: dict[str, str] | None = None) -> str:
    """The audit report as markdown; `figures` maps a title to an image path (omit it for a text-only report)."""
    return render_markdown(_audit_document(summary, loop, figures))


def audit_html(summary: dict, loop: dict | None = None, figures: dict[str, str] | None = None) -> str:
    """The same report as one HTML page with inline CSS; figures are linked by their (relative) paths."""
    return render_html(_audit_document(summary, loop, figures))


# ---------------------------------------------------------------------------------------------------------------
# Input checks


@dataclass(frozen=True)
class _Columns:
    """The score table's columns the figures need, as numpy arrays of length N."""

    label: np.ndarray  # int
    score: np.ndarray  # float64, the removal method's score
    flagged: np.ndarray  # bool, the removal method's flags
    poison: np.ndarray | None  # bool ground truth, None when unknown


def _with_class_names(summary: dict, classes: list[str] | None) -> dict:
    """A copy of `summary` whose classes carry a name: `classes[label]`, else their own, else the label."""
    labels = [c["label"] for c in summary["classes"]]
    if classes is not None and labels and max(labels) >= len(classes):
        raise RobustDataError(f"{len(classes)} class names given, but the summary has label {max(labels)}")
    named = [{**c, "name": str(classes[c["label"]] if classes is not None else c.get("name", c["label"]))}
             for c in summary["classes"]]
    return {**summary, "classes": named}


def _audit_columns(summary: dict, scores: pa.Table, images: torch.Tensor) -> _Columns:
    method = summary["removal_method"]
    if method not in summary["methods"]:
        raise RobustDataError(f"removal method {method!r} is not an audited method: {sorted(summary['methods'])}")
    needed = ["label", "is_poison", f"{method}_score", f"{method}_flagged"]
    missing = [name for name in needed if name not in scores.column_names]
    if missing:
        raise RobustDataError(f"scores table lacks columns {missing}; it has {scores.column_names}")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise RobustDataError(f"images must be uint8 (N, C, H, W), C 1 or 3, not {images.dtype} {tuple(images.shape)}")
    if len(images) != scores.num_rows or scores.num_rows == 0:
        raise RobustDataError(f"{scores.num_rows} score rows for {len(images)} images: must be aligned and non-empty")
    score = scores[f"{method}_score"].to_numpy(zero_copy_only=False).astype(np.float64)
    if not np.isfinite(score).all():
        raise RobustDataError(f"{method}_score has missing or non-finite values")
    truth = scores["is_poison"]
    if summary["ground_truth"] and truth.null_count:
        raise RobustDataError(f"summary says ground truth exists, but is_poison has {truth.null_count} nulls")
    return _Columns(label=scores["label"].to_numpy(zero_copy_only=False),
                    score=score,
                    flagged=scores[f"{method}_flagged"].fill_null(False).to_numpy(zero_copy_only=False),
                    poison=truth.to_numpy(zero_copy_only=False).astype(bool) if summary["ground_truth"] else None)


def _grid_classes(summary: dict) -> list[dict]:
    """Classes judged poisoned; when none is, the most anomalous one, so the reader still sees its top images."""
    poisoned = [c for c in summary["classes"] if c["poisoned"]]
    if poisoned or not summary["classes"]:
        return poisoned
    return [max(summary["classes"], key=lambda c: -math.inf if c["statistic"] is None else c["statistic"])]


# ---------------------------------------------------------------------------------------------------------------
# Figures

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


def _histogram_figure(summary: dict, columns: _Columns) -> Figure:
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


def _histogram_panel(ax, c: dict, columns: _Columns, x: np.ndarray, edges: np.ndarray) -> None:
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


def _suspicious_figure(c: dict, columns: _Columns, images: torch.Tensor, method: str) -> Figure:
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


def _remove_stale_grids(figures_dir: Path, keep: set[Path]) -> None:
    """Drop image grids of classes an earlier run judged poisoned and this one does not, so the
    directory (which DVC versions) holds only what the current report shows."""
    for path in figures_dir.glob("suspicious_*.png"):
        if path not in keep:
            path.unlink()


# ---------------------------------------------------------------------------------------------------------------
# Document: built as blocks, rendered to markdown and to HTML, so the two always say the same thing


@dataclass(frozen=True)
class DocTable:
    header: list[str]
    rows: list[list[str]]
    marked: list[bool]  # rows to highlight (classes judged poisoned, the removal method)


@dataclass(frozen=True)
class DocImage:
    title: str
    src: str


DocBlock = list[str] | DocTable | DocImage  # a bullet list, a table, a figure


def _audit_document(summary: dict, loop: dict | None, figures: dict[str, str] | None) -> list[tuple[str, list[DocBlock]]]:
    """(heading, blocks) sections; the first heading is the title."""
    sections = [("Poisoning audit", [_headline(summary)])]
    if loop:
        sections.append(("Before and after removal", [_loop_table(loop)]))
    sections.append(("Per class", [_class_table(summary)]))
    sections.append(("Methods", [_methods_table(summary)]))
    if figures:
        sections.append(("Figures", [DocImage(title, src) for title, src in figures.items()]))
    return sections


def _number(value: float | None, spec: str) -> str:
    return MISSING if value is None else format(value, spec)


def _rate(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.2f}%"


def _removal_metrics(summary: dict) -> dict | None:
    return summary["methods"][summary["removal_method"]].get("metrics")


def _headline(summary: dict) -> list[str]:
    method, n, flagged = summary["removal_method"], summary["num_samples"], summary["num_flagged"]
    items = [f"Flagged {flagged} of {n} samples ({_rate(flagged / n if n else None)}) for removal by {method}."]
    poisoned = [c for c in summary["classes"] if c["poisoned"]]
    items.append("Classes judged poisoned: " + ", ".join(
        f"{c['name']} (≈{c['estimated_poisons']} poisons)" for c in poisoned) + "." if poisoned
        else "No class judged poisoned.")
    skipped = [c for c in summary["classes"] if c.get("status", "ok") != "ok"]
    if skipped:  # degenerate classes (empty, too small, constant features) cannot be audited: say so
        items.append("Classes not audited normally: "
                     + ", ".join(f"{c['name']} ({c['status']})" for c in skipped) + ".")
    metrics = _removal_metrics(summary)
    if metrics:
        o = metrics["overall"]
        items.append(f"Against ground truth ({o['tp'] + o['fn']} poisons): TPR {_rate(o['tpr'])}, "
                     f"FPR {_rate(o['fpr'])}, precision {_rate(o['precision'])}, "
                     f"AUROC {_number(o['auroc'], '.4f')}, AUPRC {_number(o['auprc'], '.4f')}.")
    else:
        items.append("No ground truth: detection rates cannot be measured.")
    eps = summary.get("eps")
    setting = f"Representation layer {summary['layer']}, {summary['mode']} mode" + (
        f" (eps {eps:g})" if eps is not None else "")
    seconds = summary.get("seconds") or {}
    if seconds:
        setting += "; " + ", ".join(f"{step} {s:.1f} s" for step, s in seconds.items())
    return items + [setting + "."]


def _loop_table(loop: dict) -> DocTable:
    rows = [[str(r["model"]), str(r["train_samples"]), _rate(r["clean_accuracy"]), _rate(r["asr"])]
            for r in loop["rows"]]
    return DocTable(["model", "train samples", "clean accuracy", "attack success rate"], rows, [False] * len(rows))


def _class_table(summary: dict) -> DocTable:
    metrics = _removal_metrics(summary)
    per_class = {m["label"]: m for m in metrics["per_class"]} if metrics else {}
    header = ["class", "label", "n", "budget", "flagged", "est. poisons", "statistic", "threshold", "poisoned",
              "status"]
    if metrics:
        header += ["true poisons", "TP", "FP", "TPR", "FPR"]
    rows = []
    for c in summary["classes"]:
        row = [c["name"], str(c["label"]), str(c["n"]), _number(c["budget"], "d"), str(c["flagged"]),
               str(c["estimated_poisons"]), _number(c["statistic"], ".4g"), _number(c["threshold"], ".4g"),
               "yes" if c["poisoned"] else "no", c.get("status", MISSING)]
        if metrics:
            m = per_class.get(c["label"], {})
            row += [_number(c.get("poisons"), "d"), _number(m.get("tp"), "d"), _number(m.get("fp"), "d"),
                    _rate(m.get("tpr")), _rate(m.get("fpr"))]
        rows.append(row)
    return DocTable(header, rows, [bool(c["poisoned"]) for c in summary["classes"]])


def _methods_table(summary: dict) -> DocTable:
    """Each method's flags; with ground truth, its overall detection metrics (the removal method is marked)."""
    truth = _removal_metrics(summary) is not None
    header = ["method", "flagged"] + (["TP", "FP", "FN", "TPR", "FPR", "precision", "AUROC", "AUPRC",
                                       "recall at budget"] if truth else [])
    rows = []
    for name, method in summary["methods"].items():
        row = [name + (" (removal)" if name == summary["removal_method"] else ""), str(method["flagged"])]
        if truth:
            o = (method.get("metrics") or {}).get("overall", {})
            row += [_number(o.get(k), "d") for k in ("tp", "fp", "fn")]
            row += [_rate(o.get(k)) for k in ("tpr", "fpr", "precision")]
            row += [_number(o.get(k), ".4f") for k in ("auroc", "auprc")] + [_rate(o.get("recall_at_budget"))]
        rows.append(row)
    return DocTable(header, rows, [name == summary["removal_method"] for name in summary["methods"]])


# ---------------------------------------------------------------------------------------------------------------
# Rendering

_MARKDOWN_SPECIAL = str.maketrans({ch: "\\" + ch for ch in "\\`*[]|"})


def _md(text: str) -> str:
    """Text safe in markdown: no raw HTML (class names come from users) and no table-breaking pipes."""
    return html.escape(text, quote=False).translate(_MARKDOWN_SPECIAL)


def render_markdown(document: list[tuple[str, list[DocBlock]]]) -> str:
    lines: list[str] = []
    for depth, (heading, blocks) in enumerate(document):
        lines += [("#" if depth == 0 else "##") + " " + _md(heading), ""]
        for block in blocks:
            lines += _markdown_block(block) + [""]
    return "\n".join(lines)


def _markdown_block(block: DocBlock) -> list[str]:
    if isinstance(block, list):
        return [f"- {_md(item)}" for item in block]
    if isinstance(block, DocTable):
        return (["| " + " | ".join(_md(h) for h in block.header) + " |", "|" + "---|" * len(block.header)]
                + ["| " + " | ".join(_md(cell) for cell in row) + " |" for row in block.rows])
    return [f"![{_md(block.title)}]({block.src.replace(' ', '%20')})"]


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 72em; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
tr.marked td { background: #fde8e8; font-weight: 600; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; }
"""


def render_html(document: list[tuple[str, list[DocBlock]]]) -> str:
    title = html.escape(document[0][0])
    parts = ["<!DOCTYPE html>", '<html lang="en">', '<head><meta charset="utf-8">', f"<title>{title}</title>",
             f"<style>{_CSS}</style></head>", "<body>"]
    for depth, (heading, blocks) in enumerate(document):
        tag = "h1" if depth == 0 else "h2"
        parts.append(f"<{tag}>{html.escape(heading)}</{tag}>")
        parts += [_html_block(block) for block in blocks]
    return "\n".join(parts + ["</body>", "</html>", ""])


def _html_block(block: DocBlock) -> str:
    if isinstance(block, list):
        return "<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in block) + "</ul>"
    if isinstance(block, DocTable):
        head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in block.header) + "</tr>"
        body = ["<tr{}>".format(' class="marked"' if marked else "")
                + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
                for row, marked in zip(block.rows, block.marked)]
        return "<table>\n<thead>" + head + "</thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"
    return (f'<figure><img src="{html.escape(block.src)}" alt="{html.escape(block.title)}">'
            f"<figcaption>{html.escape(block.title)}</figcaption></figure>")

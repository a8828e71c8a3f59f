"""The audit report (report.md, report.html, figures/*.png) and the evaluation summary (summary.md).

Every file is written atomically, figures first and the documents last, so a report.md that exists is
complete and its figures exist too. The documents are rendered by robustdata.report.render's templates.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from robustdata.errors import RobustDataError
from robustdata.report import figures as plots
from robustdata.report.formats import MISSING, number, percent
from robustdata.report.render import DocImage, DocTable, Document, render_html, render_markdown, write_documents

FIGURES_DIR = "figures"


# ---------------------------------------------------------------------------------------------------------------
# Audit report: public entry points


def write_audit_report(out_dir: Path, summary: dict, scores: pa.Table, images: torch.Tensor | None,
                       loop: dict | None = None, classes: list[str] | None = None) -> dict[str, Path]:
    """Write out_dir/report.md, out_dir/report.html and out_dir/figures/*.png; return their paths.

    `scores` has one row per training sample, aligned with `images` (N, C, H, W) uint8 with C in {1, 3}
    (None: a streamed audit, which holds no images; the report then draws no image grids);
    `classes`, when given, names label i `classes[i]` (overriding the names in `summary`). The returned
    dict maps "markdown", "html", "score_histograms" and "suspicious_<label>" to the written files.
    Same inputs give byte-identical files.
    """
    out_dir = Path(out_dir)
    summary = _with_class_names(summary, classes)
    columns = _audit_columns(summary, scores, images)
    paths: dict[str, Path] = {}
    figures: dict[str, str] = {}  # title -> path relative to out_dir, for the documents

    def save(name: str, title: str, figure) -> None:
        relative = f"{FIGURES_DIR}/{name}.png"
        paths[name] = out_dir / relative
        figures[title] = relative
        plots.write_png(paths[name], figure)

    method = summary["removal_method"]
    save("score_histograms", f"{method} score per class", plots.histogram_figure(summary, columns))
    for c in _grid_classes(summary) if images is not None else []:
        save(f"suspicious_{c['label']}", f"Most suspicious images of class {c['name']} (label {c['label']})",
             plots.suspicious_figure(c, columns, images, method))
    # The documents last: a report that exists never links to a figure that does not.
    paths.update(write_documents(out_dir, "report", _audit_document(summary, loop, figures)))
    _remove_stale_grids(out_dir / FIGURES_DIR, keep=set(paths.values()))
    return paths


def audit_markdown(summary: dict, loop: dict | None = None, figures: dict[str, str] | None = None) -> str:
    """The audit report as markdown; `figures` maps a title to an image path (omit it for a text-only report)."""
    return render_markdown(_audit_document(summary, loop, figures))


def audit_html(summary: dict, loop: dict | None = None, figures: dict[str, str] | None = None) -> str:
    """The same report as one HTML page; figures are linked by their (relative) paths."""
    return render_html(_audit_document(summary, loop, figures))


# ---------------------------------------------------------------------------------------------------------------
# Input checks


def _with_class_names(summary: dict, classes: list[str] | None) -> dict:
    """A copy of `summary` whose classes carry a name: `classes[label]`, else their own, else the label."""
    labels = [c["label"] for c in summary["classes"]]
    if classes is not None and labels and max(labels) >= len(classes):
        raise RobustDataError(f"{len(classes)} class names given, but the summary has label {max(labels)}")
    named = [{**c, "name": str(classes[c["label"]] if classes is not None else c.get("name", c["label"]))}
             for c in summary["classes"]]
    return {**summary, "classes": named}


def _audit_columns(summary: dict, scores: pa.Table, images: torch.Tensor | None) -> plots.ScoreColumns:
    method = summary["removal_method"]
    if method not in summary["methods"]:
        raise RobustDataError(f"removal method {method!r} is not an audited method: {sorted(summary['methods'])}")
    needed = ["label", "is_poison", f"{method}_score", f"{method}_flagged"]
    missing = [name for name in needed if name not in scores.column_names]
    if missing:
        raise RobustDataError(f"scores table lacks columns {missing}; it has {scores.column_names}")
    if images is not None and (images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3)):
        raise RobustDataError(f"images must be uint8 (N, C, H, W), C 1 or 3, not {images.dtype} {tuple(images.shape)}")
    if images is not None and len(images) != scores.num_rows or scores.num_rows == 0:
        raise RobustDataError(f"{scores.num_rows} score rows for {len(images)} images: must be aligned and non-empty")
    score = scores[f"{method}_score"].to_numpy(zero_copy_only=False).astype(np.float64)
    if not np.isfinite(score).all():
        raise RobustDataError(f"{method}_score has missing or non-finite values")
    truth = scores["is_poison"]
    if summary["ground_truth"] and truth.null_count:
        raise RobustDataError(f"summary says ground truth exists, but is_poison has {truth.null_count} nulls")
    return plots.ScoreColumns(
        label=scores["label"].to_numpy(zero_copy_only=False), score=score,
        flagged=scores[f"{method}_flagged"].fill_null(False).to_numpy(zero_copy_only=False),
        poison=truth.to_numpy(zero_copy_only=False).astype(bool) if summary["ground_truth"] else None)


def _grid_classes(summary: dict) -> list[dict]:
    """Classes judged poisoned or inconclusive; when none is, the most anomalous one, so the reader still sees
    its top images."""
    poisoned = [c for c in summary["classes"] if c.get("verdict", "poisoned" if c["poisoned"] else "clean") != "clean"]
    if poisoned or not summary["classes"]:
        return poisoned
    return [max(summary["classes"], key=lambda c: -math.inf if c["statistic"] is None else c["statistic"])]


def _remove_stale_grids(figures_dir: Path, keep: set[Path]) -> None:
    """Drop image grids of classes an earlier run judged poisoned and this one does not, so the
    directory (which DVC versions) holds only what the current report shows."""
    for path in figures_dir.glob("suspicious_*.png"):
        if path not in keep:
            path.unlink()


# ---------------------------------------------------------------------------------------------------------------
# Audit report: its sections


def _audit_document(summary: dict, loop: dict | None, figures: dict[str, str] | None) -> Document:
    """(heading, blocks) sections; the first heading is the title."""
    sections: Document = [("Poisoning audit", [_headline(summary)])]
    if loop:
        sections.append(("Before and after removal", [_loop_table(loop)]))
    sections.append(("Per class", [_class_table(summary)]))
    sections.append(("Methods", [_methods_table(summary)]))
    if figures:
        sections.append(("Figures", [DocImage(title, src) for title, src in figures.items()]))
    return sections


def _removal_metrics(summary: dict) -> dict | None:
    return summary["methods"][summary["removal_method"]].get("metrics")


def _headline(summary: dict) -> list[str]:
    method, n, flagged = summary["removal_method"], summary["num_samples"], summary["num_flagged"]
    verdict = summary.get("verdict")
    reasons = [f"{c['name']}: {'; '.join(c['reasons'])}" for c in summary["classes"]
               if c.get("verdict") == "inconclusive"]
    items = [f"Verdict: {verdict}." + (" Inconclusive classes (the audit cannot rule out poisoning): "
                                       + " | ".join(reasons) + "." if reasons else "")] if verdict else []
    items += [f"Flagged {flagged} of {n} samples ({percent(flagged / n if n else None)}) for removal by {method}; "
             "flagged.csv lists them, most suspicious first, with the file each came from (first_origin)."]
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
        items.append(f"Against ground truth ({o['tp'] + o['fn']} poisons): TPR {percent(o['tpr'])}, "
                     f"FPR {percent(o['fpr'])}, precision {percent(o['precision'])}, "
                     f"AUROC {number(o['auroc'], '.4f')}, AUPRC {number(o['auprc'], '.4f')}.")
    else:
        items.append("No ground truth: detection rates cannot be measured.")
    return items + [_sensitivity(summary.get("sensitivity")), _setting(summary)]


def _sensitivity(stated: dict | None) -> str:
    """The stated sensitivity (robustdata/audit/sensitivity.py), with its trials and confidence bound."""
    if stated is None:
        return ("Sensitivity not measured (audit.sensitivity_rounds 0): a clean verdict says no backdoor was found, "
                "not how small a backdoor would have been.")
    counts = ", ".join(f"{percent(e['fraction'])}: {e['detected']}/{e['trials']}" for e in stated["per_fraction"])
    head = (f"Sensitivity: {stated['canary']} canaries at {percent(stated['fraction'])} of a class or more were "
            f"all detected ({stated['trials_at_or_above']} trials; one-sided 95% lower bound on the detection "
            f"probability {percent(stated['lower_95'])})" if stated["fraction"] is not None else
            f"Sensitivity: none stated: {stated['canary']} canaries were missed even at the largest fraction tried")
    return f"{head}. Detected per fraction of a class: {counts} ({stated['rounds']} retrainings)."


def _setting(summary: dict) -> str:
    """What the audit read and how long each step took."""
    eps = summary.get("eps")
    setting = f"Representation layer {summary['layer']}, {summary['mode']} mode" + (
        f" (eps {eps:g})" if eps is not None else "")
    seconds = summary.get("seconds") or {}
    if seconds:
        setting += "; " + ", ".join(f"{step} {s:.1f} s" for step, s in seconds.items())
    return setting + "."


def _loop_table(loop: dict) -> DocTable:
    rows = [[str(r["model"]), str(r["train_samples"]), percent(r["clean_accuracy"]), percent(r["asr"])]
            for r in loop["rows"]]
    return DocTable(["model", "train samples", "clean accuracy", "attack success rate"], rows)


def _class_table(summary: dict) -> DocTable:
    metrics = _removal_metrics(summary)
    per_class = {m["label"]: m for m in metrics["per_class"]} if metrics else {}
    header = ["class", "label", "n", "budget", "flagged", "est. poisons", "statistic", "z", "threshold", "verdict",
              "status"]
    if metrics:
        header += ["true poisons", "TP", "FP", "TPR", "FPR"]
    rows = []
    for c in summary["classes"]:
        row = [c["name"], str(c["label"]), str(c["n"]), number(c["budget"], "d"), str(c["flagged"]),
               str(c["estimated_poisons"]), number(c["statistic"], ".4g"), number(c.get("z"), ".2f"),
               number(c["threshold"], ".4g"), c.get("verdict", MISSING), c.get("status", MISSING)]
        if metrics:
            m = per_class.get(c["label"], {})
            row += [number(c.get("poisons"), "d"), number(m.get("tp"), "d"), number(m.get("fp"), "d"),
                    percent(m.get("tpr")), percent(m.get("fpr"))]
        rows.append(row)
    return DocTable(header, rows, [c.get("verdict") != "clean" for c in summary["classes"]])


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
            row += [number(o.get(k), "d") for k in ("tp", "fp", "fn")]
            row += [percent(o.get(k)) for k in ("tpr", "fpr", "precision")]
            row += [number(o.get(k), ".4f") for k in ("auroc", "auprc")] + [percent(o.get("recall_at_budget"))]
        rows.append(row)
    return DocTable(header, rows, [name == summary["removal_method"] for name in summary["methods"]])


# ---------------------------------------------------------------------------------------------------------------
# Evaluation summary

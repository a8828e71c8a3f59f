"""The results page (reports/index.html + index.md): one page a person opens after a run.

It gathers what each stage already wrote (JSON metrics and figures) into three
tables, the audit before/after, the robustification experiment and the models'
evaluation, with the figures below. It computes nothing new: every number on
the page is read from a metrics file that `dvc metrics show` prints too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from robustdata.config import Params
from robustdata.errors import DataError
from robustdata.io import read_json
from robustdata.report.formats import number, percent
from robustdata.report.render import DocImage, DocTable, Document, write_documents
from robustdata.report.robustify import KIND_NAMES, accuracy_cells, attack_title, kinds_and_attacks


def metrics_files(params: Params) -> dict[str, Path]:
    """Where each stage's metrics live (DVC metrics files, all of them)."""
    return {"audit": Path(params.audit.report) / "metrics.json",
            "audit_loop": Path(params.audit_eval.out) / "metrics.json",
            "robustify": Path(params.robustify_eval.out) / "summary.json",
            "evaluate": Path(params.evaluate.out) / "metrics.json"}


def results_page(params: Params) -> dict[str, Any]:
    """reports/index.html + index.md from whatever stages have run; an error if none has."""
    # a stage that has not run has no metrics yet; one whose file is unreadable is an error (read_json)
    inputs = {name: read_json(path) if path.exists() else None for name, path in metrics_files(params).items()}
    if not any(inputs.values()):
        raise DataError("no stage results to show: run `make run` or `dvc repro` first", path=params.results.out)
    figure_dirs = [Path(params.audit_eval.out), Path(params.robustify_eval.out)]
    paths = write_results_page(Path(params.results.out), inputs, figure_dirs)
    return {"html": str(paths["html"]), "markdown": str(paths["markdown"]),
            "sections": [name for name, value in inputs.items() if value]}


def audit_table(audit_metrics: dict[str, Any] | None, loop_metrics: dict[str, Any] | None) -> list:
    """Bullets from the audit's gate metrics, and the before/after table (clean accuracy and ASR per model)."""
    blocks: list = []
    if audit_metrics:
        verdict = f"verdict {audit_metrics['verdict']}: " if "verdict" in audit_metrics else ""
        inconclusive = (f", {audit_metrics['inconclusive_classes']} inconclusive"
                        if audit_metrics.get("inconclusive_classes") else "")
        bullets = [f"{verdict}flagged {audit_metrics['num_flagged']} samples "
                   f"({percent(audit_metrics['flagged_fraction'])} of the training set), "
                   f"{audit_metrics['poisoned_classes']} class(es) judged poisoned{inconclusive}"]
        if audit_metrics.get("tpr") is not None:
            bullets.append(f"against the planted canaries: TPR {percent(audit_metrics['tpr'])}, "
                           f"FPR {percent(audit_metrics['fpr'])}, AUROC {number(audit_metrics['auroc'], '.4f')}")
        blocks.append(bullets)
    if loop_metrics:
        rows = [[name, percent(m["clean_accuracy"]), percent(m["asr"])] for name, m in loop_metrics.items()]
        blocks.append(DocTable(["model", "clean accuracy", "attack success rate"], rows,
                               [name == "filtered" for name in loop_metrics]))
    return blocks


def robustify_table(summary: dict[str, Any] | None) -> list:
    """Mean +- std over seeds of every dataset's classifiers, as reports/robustify/summary.json has them."""
    if not summary:
        return []
    results = summary["results"]
    kinds, attacks = kinds_and_attacks(results)
    header = ["trained on", "seeds", "clean %"] + [f"{attack_title(a)} %" for a in attacks]
    rows = [[KIND_NAMES[k], str(len(results[k]["runs"]))] + accuracy_cells(results[k], attacks) for k in kinds]
    return [DocTable(header, rows, [k == "robust" for k in kinds])]


def evaluation_table(metrics: dict[str, Any] | None) -> list:
    if not metrics:
        return []
    columns = sorted({key for m in metrics.values() for key in m})
    rows = [[name] + [percent(m.get(c)) for c in columns] for name, m in metrics.items()]
    return [DocTable(["model"] + [c.replace("_", " ") for c in columns], rows)]


def figures(root: Path, directories: list[Path]) -> list[DocImage]:
    """Every PNG under the given report directories, linked relative to the page."""
    images = []
    for directory in directories:
        for path in sorted(Path(directory).glob("figures/*.png")):
            images.append(DocImage(f"{directory.name}: {path.stem.replace('_', ' ')}",
                                   Path(os.path.relpath(path, root)).as_posix()))
    return images


def document(root: Path, inputs: dict[str, Any], figure_dirs: list[Path]) -> Document:
    sections: Document = [("robustdata results", [[
        "Every number below is read from the JSON metrics the stages wrote (dvc metrics show prints the same)."]])]
    audit = audit_table(inputs.get("audit"), inputs.get("audit_loop"))
    if audit:
        sections.append(("Poisoning audit: before and after removing what it flagged", audit))
    robust = robustify_table(inputs.get("robustify"))
    if robust:
        sections.append(("Robust and non-robust features: standard classifiers on each dataset, original test set",
                         robust))
    evaluation = evaluation_table(inputs.get("evaluate"))
    if evaluation:
        sections.append(("Models: clean and robust accuracy", evaluation))
    images = figures(root, figure_dirs)
    if images:
        sections.append(("Figures", images))
    return sections


def write_results_page(root: Path, inputs: dict[str, Any], figure_dirs: list[Path]) -> dict[str, Path]:
    """<root>/index.md and <root>/index.html (atomic)."""
    return write_documents(Path(root), "index", document(Path(root), inputs, figure_dirs))

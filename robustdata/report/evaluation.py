"""The evaluation report of trained models (summary.md) and its rows (a Prefect table artifact). Light: no
plotting, so a training stage that imports its flow does not load matplotlib."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from robustdata.report.formats import percent
from robustdata.report.render import DocTable, render_markdown
from robustdata.train.training import model_metrics


def evaluation_markdown(results: list[dict[str, Any]]) -> str:
    """summary.md: one row per model (clean accuracy, then robust accuracy per attack), and per-class accuracy."""
    attacks = [(a["threat"], a["eps"], a["steps"], a["restarts"]) for a in results[0]["robust"]] if results else []
    header = ["model", "arch", "adversarially trained", "clean accuracy"] + [
        f"{t} eps {e:g} (PGD-{s} x{r})" for t, e, s, r in attacks]
    rows = [[Path(r["model"]).name, r["arch"], "yes" if r["trained_adversarially"] else "no",
             percent(r["clean"]["accuracy"])] + [f"{percent(a['accuracy'])} (n={a['n']})" for a in r["robust"]]
            for r in results]
    classes = len(results[0]["clean"]["per_class"]) if results else 0
    per_class = [[Path(r["model"]).name] + [percent(v) for v in r["clean"]["per_class"]] for r in results]
    return render_markdown([
        ("Evaluation", [DocTable(header, rows),
                        "Robust accuracy is measured on the first n test images; clean accuracy on all of them."]),
        ("Per-class clean accuracy", [DocTable(["model"] + [str(c) for c in range(classes)], per_class)])])


def evaluation_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per model (clean accuracy, robust accuracy per attack as `robust_<threat>_<eps>`), for a
    table artifact or metrics.json."""
    return [{"model": Path(r["model"]).name, "arch": r["arch"], "adversarially_trained": r["trained_adversarially"],
             **model_metrics(r)} for r in results]

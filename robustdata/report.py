"""Reports: markdown tables (and, later, plots) from JSON results."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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

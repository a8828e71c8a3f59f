"""How every report writes a number: one place, so the audit report, the robustify report, the evaluation
summary and the results page print the same value the same way."""

from __future__ import annotations

MISSING = "–"  # a value that is undefined (the AUROC of a class without poisons) or was not measured


def percent(value: float | None) -> str:
    """A fraction in [0, 1] as a percentage with two decimals: 0.99313 -> "99.31%"."""
    return MISSING if value is None else f"{100 * value:.2f}%"


def number(value: float | None, spec: str) -> str:
    """`value` in the format `spec` ("d", ".4f", ".4g")."""
    return MISSING if value is None else format(value, spec)


def mean_std(stats: dict[str, float] | None, unit: str = "") -> str:
    """Mean +- std over seeds of a fraction, in percent points with one decimal: "95.0 ± 0.3".

    `stats` has "mean", "std" and "n" (the number of seeds). One seed has no spread to show, so it reads
    "95.0 (n=1)", never "95.0 ± 0.0". `unit` follows the last number ("95.0 ± 0.3%", "95.0% (n=1)").
    """
    if stats is None:
        return MISSING
    mean = f"{100 * stats['mean']:.1f}"
    if stats.get("n") == 1:
        return f"{mean}{unit} (n=1)"
    return f"{mean} ± {100 * stats['std']:.1f}{unit}"

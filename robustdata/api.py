"""The Python API: one call per pipeline step, for MLOps code that drives robustdata directly.

    from robustdata import api

    api.ingest(source="mnist", out="data/mnist")
    result = api.audit(model="models/suspect", data="data/poisoned", out="data/filtered", report="reports/audit")
    if result["num_flagged"]:
        ...

Each function takes the keys of its params.yaml section as keyword arguments (anything left out
keeps the section's default, see params.yaml), validates them, runs the same Prefect flow as the
command line and DVC stage, and returns the flow's summary as a dict. Bad input raises
robustdata.errors.RobustDataError (DataError for data: `.path` names the file) before anything is
written. Flows need a Prefect API: PREFECT_API_URL, or a temporary local server started for the call.

This module is the stable surface: the names below keep their meaning across minor versions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from robustdata.allocator import keep_freed_memory
from robustdata.config import (BUILD_KINDS, TRAIN_KINDS, AuditParams, EvaluateParams, IngestParams, Params, PoisonParams,
                               TrainParams, build_defaults, load_params, validation_problems)
from robustdata.errors import RobustDataError

__all__ = ["audit", "build", "evaluate", "fit", "ingest", "load_params", "pipeline", "plant_poisons"]

keep_freed_memory()  # an entry point: this process trains with fixed malloc thresholds (robustdata/allocator.py)

Section = TypeVar("Section", bound=BaseModel)


def section(default: Section, options: dict[str, Any], what: str) -> Section:
    """`default` with `options` laid over it, validated: an unknown key or a bad value is a RobustDataError."""
    try:
        return type(default).model_validate({**default.model_dump(), **options})
    except ValidationError as exc:
        raise RobustDataError(f"invalid {what} options: {validation_problems(exc)}") from exc


def ingest(**options: Any) -> dict[str, Any]:
    """Ingest a source into shards + manifest + card (the `ingest` section's keys: source, out, limit, ...)."""
    from robustdata.flows.ingest import ingest_flow

    return ingest_flow(section(IngestParams(), options, "ingest"))


def plant_poisons(**options: Any) -> dict[str, Any]:
    """Plant backdoor poisons with ground truth (the `poison` section: data, out, attack, trigger, targeting,
    target, rate, ...)."""
    from robustdata.flows.audit import poison_flow

    return poison_flow(section(PoisonParams(), options, "poison"))


def fit(kind: str = "standard", **options: Any) -> dict[str, Any]:
    """Train a model with the recipe of params.yaml's train_<kind> section (standard | robust | plain |
    suspect | clean), with `options` (data, out, epochs, lr, ...) laid over it."""
    if kind not in TRAIN_KINDS:
        raise RobustDataError(f"unknown model kind {kind!r}; valid: {sorted(TRAIN_KINDS)}")
    from robustdata.flows.train import train_flow

    default: TrainParams = getattr(Params(), TRAIN_KINDS[kind])
    return train_flow(section(default, options, f"train_{kind}"))


def evaluate(**options: Any) -> dict[str, Any]:
    """Clean and robust accuracy of models (the `evaluate` section: models, data, attacks, limit, out)."""
    from robustdata.flows.train import evaluate_flow

    return evaluate_flow(section(EvaluateParams(), options, "evaluate"))


def audit(**options: Any) -> dict[str, Any]:
    """Audit a training set for backdoor poisons (the `audit` section: model, data, eps, layer, out, report, ...).

    Returns num_flagged, poisoned_classes, metrics (what reports/<report>/metrics.json holds), report, out.
    """
    from robustdata.flows.audit import audit_flow

    return audit_flow(section(AuditParams(), options, "audit"))


def build(kind: str, **options: Any) -> dict[str, Any]:
    """Build D_R (`robust`), D_NR (`nonrobust`), D_rand (`rand`) or D_det (`det`) with the build_<kind>
    section's recipe and `options` (data, model, out, steps, limit, dask, ...) laid over it."""
    if kind not in BUILD_KINDS:
        raise RobustDataError(f"unknown build kind {kind!r}; valid: {list(BUILD_KINDS)}")
    from robustdata.flows.robustify import run_build

    return run_build(section(build_defaults(kind), {**options, "kind": kind}, f"build_{kind}"))


def pipeline(params: str | Path = "params.yaml", profile: str | None = None) -> dict[str, Any]:
    """The whole pipeline as one flow (what `dvc repro` runs stage by stage); returns the results page paths."""
    from robustdata.flows.pipeline import pipeline_flow

    return pipeline_flow(load_params(params, profile=profile))

"""The audit's results as artifacts: the per-sample scores table, the summary (per-class decisions,
detection metrics against ground truth, what was audited and by what), the few numbers a CI job gates
on, and the lineage rows of the filtered set. Tables and dicts in, tables and dicts out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from robustdata.audit.metrics import detection_metrics
from robustdata.audit.scoring import AuditResult, NonFiniteFeaturesError
from robustdata.audit.verdicts import INCONCLUSIVE, POISONED, VERDICTS, overall_verdict
from robustdata.config import AuditParams
from robustdata.data.derived import module_sha256
from robustdata.data.memory import InMemoryDataset
from robustdata.errors import DataError, IntegrityError
from robustdata.io import code_version

# the library modules whose code decides the audit's scores and the filtered set (recorded in both): every
# audit method's file too, so a method added to audit/methods/ is recorded without being listed here
AUDIT_MODULES = ("audit/features.py", "audit/spectral.py", "audit/spectre.py", "audit/clustering.py",
                 "audit/filtering.py", "audit/scoring.py", "audit/verdicts.py", "data/derived.py",
                 *sorted(f"audit/methods/{path.name}" for path in (Path(__file__).parent / "methods").glob("*.py")))
# where and how the work runs, not what it computes: left out of the filtered set's card
EXECUTION_ONLY = {"workers", "dask"}
LINEAGE_COLUMNS = ("source_label", "is_poison", "trigger")


def ground_truth(manifest: pa.Table) -> torch.Tensor | None:
    """The manifest's is_poison column when every row has one, else None (unknown)."""
    column = manifest.column("is_poison")
    return None if column.null_count else torch.tensor(column.to_pylist(), dtype=torch.bool)


def non_finite_features_error(exc: NonFiniteFeaturesError, *, model: str | Path, data: str | Path, layer: str,
                              keys: list[str]) -> DataError:
    """The audit's NaN/inf error, with the model, the data and the keys of the first affected samples."""
    first = ", ".join(keys[i] for i in exc.indices) + (", ..." if exc.count > len(exc.indices) else "")
    return DataError(f"model {model} (layer {layer}) gives NaN or inf features on this data: {exc}; "
                     f"first keys: {first}", path=data)


def check_finite_scores(result: AuditResult) -> None:
    """The last guard before the Parquet file: the audit reports degenerate classes instead of scoring them NaN,
    so a non-finite score here is a bug (raised with its traceback, not as a user error)."""
    for method, scores in result.scores.items():
        bad = ~torch.isfinite(scores)
        if bad.any():
            rows = torch.nonzero(bad).flatten()
            raise RuntimeError(f"{method} scores are not finite for {len(rows)} samples (first rows "
                               f"{rows[:10].tolist()}); refusing to write them: please report this")


def scores_table(data: InMemoryDataset, manifest: pa.Table, result: AuditResult) -> pa.Table:
    """One row per audited sample: key, first origin (the user's file), label, ground truth, and
    `<method>_score` / `<method>_flagged`."""
    check_finite_scores(result)
    columns: dict[str, Any] = {
        "key": pa.array(data.keys, pa.string()),
        "first_origin": pa.array(data.first_origins, pa.string()),
        "label": pa.array(data.labels.tolist(), pa.int32()),
        "is_poison": manifest.column("is_poison").combine_chunks(),
        "source_label": manifest.column("source_label").combine_chunks(),
    }
    for method in result.scores:
        columns[f"{method}_score"] = pa.array(result.scores[method].cpu().numpy(), pa.float64())
        columns[f"{method}_flagged"] = pa.array(result.flagged[method].cpu().numpy(), pa.bool_())
    return pa.table(columns, metadata={"kind": "robustdata.audit_scores", "schema_version": "1"})


def flagged_table(scores: pa.Table, method: str) -> pa.Table:
    """The samples `method` flags, most suspicious first: key, first origin (the user's file), label, score."""
    flagged = scores.filter(scores.column(f"{method}_flagged"))
    flagged = flagged.sort_by([(f"{method}_score", "descending"), ("key", "ascending")])
    return flagged.select(["key", "first_origin", "label", f"{method}_score"]).rename_columns(
        ["key", "first_origin", "label", "score"])


def method_metrics(data: InMemoryDataset, result: AuditResult, truth: torch.Tensor | None) -> dict[str, Any]:
    """Per method: how many samples it flags and, with ground truth, its detection metrics."""
    budgets = {c["label"]: c["budget"] for c in result.classes}
    methods = {}
    for method in result.scores:
        metrics = None if truth is None else detection_metrics(
            result.scores[method], result.flagged[method], truth, data.labels, len(data.classes), budgets)
        methods[method] = {"flagged": int(result.flagged[method].sum()), "metrics": metrics}
    return methods


def audit_summary(params: AuditParams, data: InMemoryDataset, result: AuditResult, truth: torch.Tensor | None,
                  seconds: dict[str, float], model_sidecar: dict[str, Any], manifest_sha256: str) -> dict[str, Any]:
    """summary.json: the mode, every per-class decision, each method's metrics, what was audited and by what."""
    classes = []
    for entry in result.classes:
        members = data.labels == entry["label"]
        classes.append({**entry, "name": data.classes[entry["label"]],
                        "poisons": None if truth is None else int(truth[members].sum())})
    return {
        "removal_method": result.removal_method, "layer": params.layer,
        "mode": "auto" if result.eps is None else "eps",
        "eps": result.eps, "num_samples": len(data), "num_flagged": int(result.removed.sum()),
        "ground_truth": truth is not None, "threshold": result.threshold,
        "verdict": overall_verdict(c["verdict"] for c in classes),
        "poisoned_classes": [c["label"] for c in classes if c["verdict"] == POISONED],
        "inconclusive_classes": [c["label"] for c in classes if c["verdict"] == INCONCLUSIVE],
        "classes": classes, "methods": method_metrics(data, result, truth), "seconds": seconds,
        "model": {"path": params.model_spec or str(params.model), "arch": model_sidecar["arch"],
                  "weights_path": model_sidecar.get("weights_path"),
                  "weights_sha256": model_sidecar.get("weights_sha256"),
                  "train_manifest_sha256": model_sidecar.get("data", {}).get("train_manifest_sha256")},
        # what was audited: later stages refuse data changed since (check_audited)
        "data": {"path": str(Path(params.data) / "train"), "manifest_sha256": manifest_sha256},
        "params": params.model_dump(mode="json"),
        "built_by": {"stage": "audit", **code_version(), "modules_sha256": module_sha256(*AUDIT_MODULES)},
    }


def gate_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The few numbers a CI job gates on (DVC metrics)."""
    removal = summary["methods"][summary["removal_method"]]["metrics"]
    overall = removal["overall"] if removal else {}
    return {"verdict": summary["verdict"], "verdict_code": VERDICTS.index(summary["verdict"]),  # 0 clean, 1, 2 poisoned
            "num_flagged": summary["num_flagged"], "flagged_fraction": summary["num_flagged"] / summary["num_samples"],
            "poisoned_classes": len(summary["poisoned_classes"]),
            "inconclusive_classes": len(summary["inconclusive_classes"]),
            "sensitivity_fraction": (summary.get("sensitivity") or {}).get("fraction"),
            **{k: overall.get(k) for k in ("tpr", "fpr", "precision", "auroc", "auprc") if overall}}


def separation_plot(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each class's separation statistic beside the threshold that judges it poisoned (DVC plots data)."""
    return [{"class": c["name"], "separation": c["statistic"], "threshold": c["threshold"],
             "flagged": c["flagged"]} for c in summary["classes"]]


def filtered_rows(data: InMemoryDataset, manifest: pa.Table, keep: torch.Tensor) -> list[dict[str, Any]]:
    """The lineage rows of the kept samples (indices `keep`) for the filtered set's manifest."""
    columns = {name: manifest.column(name).to_pylist() if name in manifest.schema.names else [None] * len(data)
               for name in LINEAGE_COLUMNS}
    return [{"key": data.keys[i], "origin_key": data.keys[i], "first_origin": data.first_origins[i],
             **{name: columns[name][i] for name in LINEAGE_COLUMNS}} for i in keep.tolist()]


def check_audited(summary: dict[str, Any], manifest_sha256: str, path: str | Path) -> None:
    """Refuse data that is not what the audit saw: its manifest changed after the audit."""
    audited = summary.get("data", {}).get("manifest_sha256")
    if audited != manifest_sha256:
        raise IntegrityError(f"this data is not what the audit saw (manifest sha256 {manifest_sha256[:12]}..., "
                             f"audited {str(audited)[:12]}...): it was altered or rebuilt after the audit; rerun "
                             "the audit", path=path)

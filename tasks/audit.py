"""Poison, audit and before/after tasks: paths in, datasets and reports out."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from robustdata.audit.features import extract_features
from robustdata.audit.metrics import detection_metrics
from robustdata.audit.scoring import AuditResult, NonFiniteFeaturesError, run_audit
from robustdata.config import AuditEvalParams, AuditParams, PoisonParams
from robustdata.data.manifest import open_dataset, read_manifest
from robustdata.data.memory import InMemoryDataset, load_in_memory
from robustdata.data.derived import module_sha256, write_derived
from robustdata.errors import DataError, IntegrityError
from robustdata.io import atomic_directory, code_version, read_json, write_bytes_atomic, write_json_atomic
from robustdata.audit.poisoners import Attack, Trigger, poison, triggered_test_set
from robustdata.report.documents import audit_markdown, write_audit_report
from robustdata.train.training import generator_for, load_checkpoint, predict, resolve_device
from robustdata.tasks.train import MODEL_FILE

POISON_MODULES = ("audit/poisoners.py", "data/derived.py")
# where and how the work runs, not what it computes: left out of the filtered set's card
EXECUTION_ONLY = {"workers", "dask"}
AUDIT_MODULES = ("audit/features.py", "audit/spectral.py", "audit/spectre.py", "audit/clustering.py",
                 "audit/filtering.py", "audit/scoring.py", "data/derived.py")


# --------------------------------------------------------------------------------------------- poison


def attack_from(params: PoisonParams) -> Attack:
    return Attack(Trigger(**params.trigger.model_dump()), target=params.target, source=params.source,
                  rate=params.rate, count=params.count)


@task(name="poison", cache_policy=NO_CACHE)
def poison_task(params: PoisonParams, progress: bool = True) -> dict[str, Any]:
    """<out>/train (poisoned, with ground truth), <out>/val (clean copy), <out>/test_triggered (for ASR)."""
    attack = attack_from(params)
    train_set, test_set = open_dataset(Path(params.data) / "train"), open_dataset(Path(params.data) / "test")
    train = load_in_memory(train_set, progress=progress)
    images, labels, is_poison = poison(train.images, train.labels, attack, torch.Generator().manual_seed(params.seed))
    rows = [{"key": key, "origin_key": key, "source_label": int(true), "is_poison": bool(flag),
             "trigger": attack.trigger.id if flag else None}
            for key, true, flag in zip(train.keys, train.labels.tolist(), is_poison.tolist())]
    test = load_in_memory(test_set, progress=progress)
    triggered, target_labels, true_labels = triggered_test_set(test.images, test.labels, attack)
    keep = attack.eligible(test.labels).tolist()
    test_keys = [key for key, kept in zip(test.keys, keep) if kept]
    test_rows = [{"key": key, "origin_key": key, "source_label": int(true), "is_poison": True,
                  "trigger": attack.trigger.id} for key, true in zip(test_keys, true_labels.tolist())]
    card_params = params.model_dump(mode="json", exclude={"out"})
    with atomic_directory(params.out) as staging:
        common = dict(classes=train.classes, name=f"{train_set.card['name']}-poisoned", stage="poison",
                      params=card_params, modules=POISON_MODULES, progress=progress)
        write_derived(staging / "train", images, labels, rows, split="train", source=train_set, **common)
        write_derived(staging / "test_triggered", triggered, target_labels, test_rows, split="test_triggered",
                      source=test_set, **common)
        shutil.copytree(Path(params.data) / "val", staging / "val")
    counts = torch.bincount(train.labels[is_poison], minlength=len(train.classes)).tolist()
    return {"out": str(params.out), "poisons": int(is_poison.sum()), "train_samples": len(labels),
            "trigger": attack.trigger.id, "target": params.target, "poisons_by_source_class": counts,
            "triggered_test_samples": len(target_labels)}


# ---------------------------------------------------------------------------------------------- audit


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
    check_finite_scores(result)
    columns: dict[str, Any] = {
        "key": pa.array(data.keys, pa.string()),
        "label": pa.array(data.labels.tolist(), pa.int32()),
        "is_poison": manifest.column("is_poison").combine_chunks(),
        "source_label": manifest.column("source_label").combine_chunks(),
    }
    for method in result.scores:
        columns[f"{method}_score"] = pa.array(result.scores[method].cpu().numpy(), pa.float64())
        columns[f"{method}_flagged"] = pa.array(result.flagged[method].cpu().numpy(), pa.bool_())
    return pa.table(columns, metadata={"kind": "robustdata.audit_scores", "schema_version": "1"})


def write_parquet_atomic(path: Path, table: pa.Table) -> None:
    import io

    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    write_bytes_atomic(path, buffer.getvalue())


def audit_summary(params: AuditParams, data: InMemoryDataset, result: AuditResult, truth: torch.Tensor | None,
                  layer: str, seconds: dict[str, float], model_sidecar: dict[str, Any],
                  manifest_sha256: str) -> dict[str, Any]:
    budgets = {c["label"]: c["budget"] for c in result.classes}
    methods = {}
    for method in result.scores:
        metrics = None if truth is None else detection_metrics(
            result.scores[method], result.flagged[method], truth, data.labels, len(data.classes), budgets)
        methods[method] = {"flagged": int(result.flagged[method].sum()), "metrics": metrics}
    classes = []
    for entry in result.classes:
        members = data.labels == entry["label"]
        classes.append({**entry, "name": data.classes[entry["label"]],
                        "poisons": None if truth is None else int(truth[members].sum())})
    return {
        "removal_method": result.removal_method, "layer": layer, "mode": "auto" if result.eps is None else "eps",
        "eps": result.eps, "num_samples": len(data), "num_flagged": int(result.removed.sum()),
        "ground_truth": truth is not None, "threshold": result.threshold,
        "poisoned_classes": [c["label"] for c in classes if c["poisoned"]],
        "classes": classes, "methods": methods, "seconds": seconds,
        "model": {"path": str(params.model), "arch": model_sidecar["arch"],
                  "weights_sha256": model_sidecar.get("weights_sha256"),
                  "train_manifest_sha256": model_sidecar.get("data", {}).get("train_manifest_sha256")},
        # what was audited: later stages refuse data changed since (audit_eval_task)
        "data": {"path": str(Path(params.data) / "train"), "manifest_sha256": manifest_sha256},
        "params": params.model_dump(mode="json"),
        "built_by": {"stage": "audit", **code_version(), "modules_sha256": module_sha256(*AUDIT_MODULES)},
    }


def gate_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The few numbers a CI job gates on (DVC metrics)."""
    removal = summary["methods"][summary["removal_method"]]["metrics"]
    overall = removal["overall"] if removal else {}
    return {"num_flagged": summary["num_flagged"], "flagged_fraction": summary["num_flagged"] / summary["num_samples"],
            "poisoned_classes": len(summary["poisoned_classes"]),
            **{k: overall.get(k) for k in ("tpr", "fpr", "precision", "auroc", "auprc") if overall}}


def separation_plot(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each class's separation statistic beside the threshold that judges it poisoned (DVC plots data)."""
    return [{"class": c["name"], "separation": c["statistic"], "threshold": c["threshold"],
             "flagged": c["flagged"]} for c in summary["classes"]]


def feature_chunks(num_samples: int, batch_size: int, workers: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of whole extraction batches, one per worker (each chunk loads the model and the
    dataset, so more chunks would repeat that I/O). Chunks cut at batch boundaries run exactly the batches
    of the single pass, so the features come out bit for bit the same."""
    batches_per_chunk = max(1, math.ceil(math.ceil(num_samples / batch_size) / workers))
    step = batches_per_chunk * batch_size
    return [(start, min(start + step, num_samples)) for start in range(0, num_samples, step)]


def chunk_features(params: AuditParams, start: int, stop: int) -> torch.Tensor:
    """(stop - start, D) features of training samples [start, stop), on the CPU: one worker's share."""
    device = resolve_device(params.device)
    model, _ = load_checkpoint(Path(params.model) / MODEL_FILE, device)
    data = load_in_memory(Path(params.data) / "train", progress=False)
    return extract_features(model, data.images[start:stop], params.layer, batch_size=params.batch_size).cpu()


@task(name="audit-features", cache_policy=NO_CACHE)
def chunk_features_task(params: AuditParams, chunk: tuple[int, int]) -> torch.Tensor:
    return chunk_features(params, *chunk)


@task(name="audit", cache_policy=NO_CACHE)
def audit_task(params: AuditParams, progress: bool = True, features: torch.Tensor | None = None,
               feature_seconds: float | None = None) -> dict[str, Any]:
    """Score <data>/train through the model, write the scores + report, and the filtered dataset.

    `features`: the representation, when it was extracted elsewhere (chunks on Dask workers)."""
    device = resolve_device(params.device)
    model, sidecar = load_checkpoint(Path(params.model) / MODEL_FILE, device)
    train_set = open_dataset(Path(params.data) / "train")
    data = load_in_memory(train_set, progress=progress)
    if data.classes != sidecar["classes"]:
        raise DataError(f"the model was trained on classes {sidecar['classes']}, the data has {data.classes}",
                        path=train_set.root)
    manifest = read_manifest(train_set.manifest_path)
    truth = ground_truth(manifest)
    if features is None:
        start = time.perf_counter()
        features = extract_features(model, data.images, params.layer, batch_size=params.batch_size,
                                    progress=progress)
        feature_seconds = time.perf_counter() - start
    elif len(features) != len(data):
        raise DataError(f"features of {len(features)} samples were passed for {len(data)}", path=train_set.root)
    features = features.to(device)
    seconds = {"features": feature_seconds}
    inputs = data.images.to(device).flatten(1).float().div_(255.0)
    try:
        result = run_audit(features, inputs, data.labels.to(device), len(data.classes), eps=params.eps,
                           methods=tuple(params.methods), removal_method=params.removal_method, rank=params.rank,
                           filter_rank=params.filter_rank, spectral_k=params.spectral_k, kappa=params.kappa,
                           eps_scope=params.eps_scope,
                           generator=generator_for(params.seed, device))
    except NonFiniteFeaturesError as exc:
        raise non_finite_features_error(exc, model=params.model, data=train_set.root, layer=params.layer,
                                        keys=data.keys) from exc
    seconds.update(result.seconds)
    summary = audit_summary(params, data, result, truth, params.layer, seconds, sidecar,
                            train_set.card["manifest"]["sha256"])
    table = scores_table(data, manifest, result)
    with atomic_directory(params.report) as staging:
        write_parquet_atomic(staging / "scores.parquet", table)
        write_json_atomic(staging / "summary.json", summary)
        write_json_atomic(staging / "metrics.json", gate_metrics(summary))
        write_json_atomic(staging / "plots" / "separation.json", separation_plot(summary))
        write_audit_report(staging, summary, table, data.images, classes=data.classes)
    write_filtered(params, train_set, data, manifest, result.removed.cpu(), progress)
    return {"report": str(params.report), "out": str(params.out), "num_flagged": summary["num_flagged"],
            "poisoned_classes": summary["poisoned_classes"], "markdown": audit_markdown(summary),
            "classes": summary["classes"], "metrics": gate_metrics(summary)}


def write_filtered(params: AuditParams, train_set, data: InMemoryDataset, manifest: pa.Table,
                   removed: torch.Tensor, progress: bool) -> None:
    """<out>/train without the removed samples, keeping their lineage; <out>/val copied."""
    keep = torch.nonzero(~removed).flatten()
    columns = {name: manifest.column(name).to_pylist() for name in ("source_label", "is_poison")}
    triggers = manifest.column("trigger").to_pylist() if "trigger" in manifest.schema.names else [None] * len(data)
    rows = [{"key": data.keys[i], "origin_key": data.keys[i], "source_label": columns["source_label"][i],
             "is_poison": columns["is_poison"][i], "trigger": triggers[i]} for i in keep.tolist()]
    with atomic_directory(params.out) as staging:
        write_derived(staging / "train", data.images[keep], data.labels[keep], rows, classes=data.classes,
                      name=f"{train_set.card['name']}-filtered", split="train", source=train_set, stage="audit",
                      params=params.model_dump(mode="json", exclude={"out", "report", *EXECUTION_ONLY}),
                      modules=AUDIT_MODULES,
                      progress=progress)
        shutil.copytree(Path(params.data) / "val", staging / "val")


# ------------------------------------------------------------------------------------------ before/after


def attack_success_rate(model: torch.nn.Module, triggered: InMemoryDataset) -> float:
    """Fraction of triggered test images (true class != target) classified as the target."""
    predictions = predict(model, triggered.images).cpu()
    return float((predictions == triggered.labels).float().mean())


def check_audited(summary: dict[str, Any], manifest_sha256: str, path: str | Path) -> None:
    """Refuse data that is not what the audit saw: its manifest changed after the audit."""
    audited = summary.get("data", {}).get("manifest_sha256")
    if audited != manifest_sha256:
        raise IntegrityError(f"this data is not what the audit saw (manifest sha256 {manifest_sha256[:12]}..., "
                             f"audited {str(audited)[:12]}...): it was altered or rebuilt after the audit; rerun "
                             "the audit", path=path)


@task(name="audit-eval", cache_policy=NO_CACHE)
def audit_eval_task(params: AuditEvalParams, progress: bool = True) -> dict[str, Any]:
    """Clean accuracy and ASR of each model; metrics.json and the full audit report with the before/after table."""
    device = resolve_device(params.device)
    clean = load_in_memory(params.clean_test, progress=progress)
    triggered = load_in_memory(params.triggered_test, progress=progress)
    rows = []
    for model_dir in params.models:
        model, sidecar = load_checkpoint(Path(model_dir) / MODEL_FILE, device)
        accuracy = float((predict(model, clean.images).cpu() == clean.labels).float().mean())
        rows.append({"model": Path(model_dir).name, "train_samples": sidecar["train_samples"],
                     "clean_accuracy": accuracy, "asr": attack_success_rate(model, triggered)})
    loop = {"rows": rows}
    summary = read_json(Path(params.audit_report) / "summary.json")
    table = pq.read_table(Path(params.audit_report) / "scores.parquet")
    audited_set = open_dataset(params.audited_data)
    check_audited(summary, audited_set.card["manifest"]["sha256"], params.audited_data)
    audited = load_in_memory(audited_set, progress=progress)
    if audited.keys != table.column("key").to_pylist():
        raise DataError("the audited data and the audit's scores list different samples: rerun the audit",
                        path=params.audited_data)
    with atomic_directory(params.out) as staging:
        write_json_atomic(staging / "metrics.json", {row["model"]: {"clean_accuracy": row["clean_accuracy"],
                                                                   "asr": row["asr"]} for row in rows})
        write_audit_report(staging, summary, table, audited.images, loop=loop, classes=audited.classes)
    return {"out": str(params.out), "rows": rows, "markdown": audit_markdown(summary, loop)}

"""Poison, audit and before/after tasks: paths in, datasets and reports out."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from robustdata.audit.features import extract_features
from robustdata.audit.metrics import attack_success_rate, clean_accuracy
from robustdata.audit.results import (AUDIT_MODULES, EXECUTION_ONLY, audit_summary, check_audited, filtered_rows,
                                      flagged_table, gate_metrics, ground_truth, non_finite_features_error,
                                      scores_table, separation_plot)
from robustdata.audit.run import audit_dataset, stated_sensitivity
from robustdata.audit.scoring import NonFiniteFeaturesError
from robustdata.config import AuditEvalParams, AuditParams, PoisonParams, TrainParams
from robustdata.audit.streaming import shard_batches, should_stream, stream_audit
from robustdata.data.derived import write_derived, write_derived_samples
from robustdata.data.shards import Sample, iter_shards
from robustdata.data.manifest import Dataset, open_dataset, read_manifest
from robustdata.data.memory import InMemoryDataset, load_in_memory, sample_index
from robustdata.errors import DataError, RobustDataError
from robustdata.io import atomic_directory, read_json, write_csv_atomic, write_json_atomic, write_parquet_atomic
from robustdata.poison.plant import Planted, from_params, lineage_rows, modules_of, plant, triggered_test_set
from robustdata.report.documents import write_audit_report
from robustdata.train.external import load_external_model
from robustdata.train.training import generator_for, load_model, resolve_device

@task(name="poison", cache_policy=NO_CACHE)
def poison_task(params: PoisonParams, progress: bool = True) -> dict[str, Any]:
    """<out>/train (poisoned, with ground truth), <out>/val (clean copy), <out>/test_triggered (for ASR)."""
    attack, targeting, dose = from_params(params)
    train_set, test_set = open_dataset(Path(params.data) / "train"), open_dataset(Path(params.data) / "test")
    train = load_in_memory(train_set, progress=progress)
    generator = torch.Generator().manual_seed(params.seed)
    planted = plant(train.images, train.labels, attack, targeting, dose, len(train.classes), generator)
    test = load_in_memory(test_set, progress=progress)
    triggered, target_labels, true_labels = triggered_test_set(test.images, test.labels, planted.attack, targeting,
                                                               len(test.classes), generator)
    kept = (targeting.target_of(test.labels, len(test.classes)) >= 0).tolist()
    test_keys = [key for key, keep in zip(test.keys, kept) if keep]
    test_origins = [origin for origin, keep in zip(test.first_origins, kept) if keep]
    every_test_image = torch.ones(len(test_keys), dtype=torch.bool)
    with atomic_directory(params.out) as staging:
        common = dict(classes=train.classes, name=f"{train_set.card['name']}-poisoned", stage="poison",
                      params=params.model_dump(mode="json", exclude={"out"}),
                      modules=(*modules_of(attack), "data/derived.py"), progress=progress)
        write_derived(staging / "train", planted.images, planted.labels,
                      lineage_rows(train.keys, train.first_origins, train.labels, planted),
                      split="train", source=train_set, **common)
        triggered_set = Planted(triggered, target_labels, every_test_image, ~every_test_image, planted.attack)
        write_derived(staging / "test_triggered", triggered, target_labels,
                      lineage_rows(test_keys, test_origins, true_labels, triggered_set),
                      split="test_triggered", source=test_set, **common)
        shutil.copytree(Path(params.data) / "val", staging / "val")
    poisons = planted.is_poison
    counts = torch.bincount(train.labels[poisons], minlength=len(train.classes)).tolist()
    return {"out": str(params.out), "poisons": int(poisons.sum()), "covers": int(planted.is_cover.sum()),
            "train_samples": len(train.labels), "attack": planted.attack.id, "targeting": params.targeting,
            "targets": list(targeting.targets), "poisons_by_source_class": counts,
            "triggered_test_samples": len(target_labels)}


def audit_model(params: AuditParams, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The audited model and its sidecar: robustdata's own (`model`), or the user's (`model_spec`)."""
    if params.model_spec is not None:
        return load_external_model(params.model_spec, device, state_dict=params.state_dict,
                                   normalize=params.normalize)
    return load_model(params.model, device)


def chunk_features(params: AuditParams, start: int, stop: int) -> torch.Tensor:
    """(stop - start, D) features of training samples [start, stop), on the CPU: one worker's share."""
    model, _ = audit_model(params, resolve_device(params.device))
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
    model, sidecar = audit_model(params, device)
    train_set = open_dataset(Path(params.data) / "train")
    if sidecar["classes"] is not None and train_set.classes != sidecar["classes"]:
        raise DataError(f"the model was trained on classes {sidecar['classes']}, the data has {train_set.classes}",
                        path=train_set.root)
    streamed = features is None and should_stream(params.stream, train_set.card)
    check_sensitivity_request(params, sidecar, streamed)  # before any work: it fails on what it was given
    if streamed:
        return streamed_audit(params, model, sidecar, train_set, progress)
    data = load_in_memory(train_set, progress=progress)
    manifest = read_manifest(train_set.manifest_path)
    if features is not None and len(features) != len(data):
        raise DataError(f"features of {len(features)} samples were passed for {len(data)}", path=train_set.root)
    try:
        result = audit_dataset(model, data, params, features=features, progress=progress)
    except NonFiniteFeaturesError as exc:
        raise non_finite_features_error(exc, model=params.model_spec or params.model, data=train_set.root,
                                        layer=params.layer, keys=data.keys) from exc
    if feature_seconds is not None:
        result.seconds["features"] = feature_seconds
    summary = audit_summary(params, data, result, ground_truth(manifest), dict(result.seconds), sidecar,
                            train_set.card["manifest"]["sha256"])
    summary["sensitivity"] = sensitivity_of(params, data, sidecar, progress)
    write_audit_outputs(params, summary, scores_table(data, manifest, result), data.images, data.classes)
    write_filtered(params, train_set, data, manifest, result.removed.cpu(), progress)
    return audit_outcome(params, summary)


def check_sensitivity_request(params: AuditParams, sidecar: dict[str, Any], streamed: bool) -> None:
    """A stated sensitivity retrains the audited model's recipe on the set in memory: refuse what cannot."""
    if params.sensitivity_rounds == 0:
        return
    if streamed:
        raise RobustDataError("audit.sensitivity_rounds retrains on the set in memory; a streamed audit cannot "
                              "state it: set it to 0, or audit in memory (--no-stream) on a machine that fits it")
    if sidecar.get("params") is None:
        raise RobustDataError("audit.sensitivity_rounds retrains the audited model's recipe, which only a robustdata "
                              "model records (its model.json); set it to 0 for your own model")


def sensitivity_of(params: AuditParams, data: InMemoryDataset, sidecar: dict[str, Any], progress: bool
                   ) -> dict[str, Any] | None:
    """The stated sensitivity when params ask for it: canary rounds retraining the audited model's own recipe
    (check_sensitivity_request has vetted the request)."""
    if params.sensitivity_rounds == 0:
        return None
    recipe = TrainParams(**{**sidecar["params"], "limit": None})
    val = load_in_memory(Path(params.data) / "val", progress=progress)
    return stated_sensitivity(data, val, recipe, params, params.sensitivity_rounds)


def streamed_audit(params: AuditParams, model: torch.nn.Module, sidecar: dict[str, Any], train_set: Dataset,
                   progress: bool) -> dict[str, Any]:
    """The audit in bounded memory (robustdata/audit/streaming.py): two passes over the shards for the
    features, a third to write the filtered set; the report draws no image grids."""
    index = sample_index(train_set)
    result = stream_audit(model, shard_batches(train_set, params.batch_size), len(train_set.classes),
                          layer=params.layer, eps=params.eps, methods=tuple(params.methods),
                          removal_method=params.removal_method, rank=params.rank, filter_rank=params.filter_rank,
                          spectral_k=params.spectral_k, kappa=params.kappa, eps_scope=params.eps_scope,
                          generator=generator_for(params.seed, next(model.parameters()).device), progress=progress)
    if not torch.equal(result.labels.cpu(), index.labels):
        raise DataError("the shards' samples are not in the manifest's order: rebuild the dataset",
                        path=train_set.root)
    manifest = read_manifest(train_set.manifest_path)
    summary = audit_summary(params, index, result, ground_truth(manifest), dict(result.seconds), sidecar,
                            train_set.card["manifest"]["sha256"])
    write_audit_outputs(params, summary, scores_table(index, manifest, result), None, index.classes)
    keep = torch.nonzero(~result.removed.cpu()).flatten()
    with atomic_directory(params.out) as staging:
        write_derived_samples(staging / "train", kept_samples(train_set, filtered_rows(index, manifest, keep)),
                              len(keep), train_set.card.get("image_shape"), **filtered_card(params, train_set,
                                                                                            progress))
        shutil.copytree(Path(params.data) / "val", staging / "val")
    return audit_outcome(params, summary)


def kept_samples(dataset: Dataset, rows: list[dict[str, Any]]) -> Iterator[Sample]:
    """The samples of `dataset` whose keys `rows` hold (in order), each with its row's lineage."""
    wanted = {row["key"]: row for row in rows}
    for sample in iter_shards(dataset.shards, num_classes=len(dataset.classes)):
        row = wanted.get(sample.key)
        if row is not None:
            yield Sample(sample.key, sample.image, sample.label,
                         {k: v for k, v in row.items() if k != "key" and v is not None})


def write_audit_outputs(params: AuditParams, summary: dict[str, Any], table: pa.Table,
                        images: torch.Tensor | None, classes: list[str]) -> None:
    with atomic_directory(params.report) as staging:
        write_parquet_atomic(staging / "scores.parquet", table)
        write_csv_atomic(staging / "flagged.csv", flagged_table(table, params.removal_method))
        write_json_atomic(staging / "summary.json", summary)
        write_json_atomic(staging / "metrics.json", gate_metrics(summary))
        write_json_atomic(staging / "plots" / "separation.json", separation_plot(summary))
        write_audit_report(staging, summary, table, images, classes=classes)


def audit_outcome(params: AuditParams, summary: dict[str, Any]) -> dict[str, Any]:
    return {"report": str(params.report), "out": str(params.out), "num_flagged": summary["num_flagged"],
            "verdict": summary["verdict"], "poisoned_classes": summary["poisoned_classes"],
            "inconclusive_classes": summary["inconclusive_classes"], "data": str(params.data),
            "classes": summary["classes"], "metrics": gate_metrics(summary)}


def write_filtered(params: AuditParams, train_set: Dataset, data: InMemoryDataset, manifest: pa.Table,
                   removed: torch.Tensor, progress: bool) -> None:
    """<out>/train without the removed samples, keeping their lineage; <out>/val copied."""
    keep = torch.nonzero(~removed).flatten()
    with atomic_directory(params.out) as staging:
        write_derived(staging / "train", data.images[keep], data.labels[keep], filtered_rows(data, manifest, keep),
                      **filtered_card(params, train_set, progress))
        shutil.copytree(Path(params.data) / "val", staging / "val")


def filtered_card(params: AuditParams, train_set: Dataset, progress: bool) -> dict[str, Any]:
    """write_derived's card keywords for the filtered set."""
    return dict(classes=train_set.classes, name=f"{train_set.card['name']}-filtered", split="train",
                source=train_set, stage="audit",
                params=params.model_dump(mode="json", exclude={"out", "report", *EXECUTION_ONLY}),
                modules=AUDIT_MODULES, progress=progress)


@task(name="audit-eval", cache_policy=NO_CACHE)
def audit_eval_task(params: AuditEvalParams, progress: bool = True) -> dict[str, Any]:
    """Clean accuracy and ASR of each model; metrics.json and the full audit report with the before/after table."""
    device = resolve_device(params.device)
    clean = load_in_memory(params.clean_test, progress=progress)
    triggered = load_in_memory(params.triggered_test, progress=progress)
    rows = []
    for model_dir in params.models:
        model, sidecar = load_model(model_dir, device)
        rows.append({"model": Path(model_dir).name, "train_samples": sidecar["train_samples"],
                     "clean_accuracy": clean_accuracy(model, clean), "asr": attack_success_rate(model, triggered)})
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
    return {"out": str(params.out), "rows": rows}

#!/usr/bin/env python
"""Benchmark: the poisoning audit on MNIST, the small CNN, all-to-one attacks, against IBM ART.

For each trigger (BadNets 3x3 square, blended noise) and poison rate (fraction of
the training set), with the params of params.yaml (train_suspect, audit):
  1. plant the poisons (target class 0) and train the suspect model;
  2. extract the audited layer once (one fp32 inference pass over the training set),
     then score it in both modes, with params.yaml's methods (timed against the
     inference pass) and again with all four methods (for the comparison columns):
       eps mode: eps = the poisoned fraction of the target class (Tran et al.'s epsilon,
                 as their experiments give it); 1.5 eps removed per class in audit.eps_scope;
       auto mode: eps unknown; the filter decides which classes are poisoned and how many;
     recall/FPR/AUROC of every method, and scoring time as a fraction of the inference pass;
  3. retrain on each filtered set; clean test accuracy and attack success rate (ASR);
  4. IBM ART's SpectralSignatureDefense on the same model, layer, data and eps: its
     recall/FPR and its wall time (its own activation pass included) next to ours
     (our inference pass + scoring), side by side in the same run.
Plus a clean reference model (accuracy to compare against) and auto-mode audits of
clean training sets for --clean-seeds seeds (no class may be flagged).
Prints a table and writes reports/bench/audit.json; runs on CUDA when present.

    python benchmarks/audit.py [--rates 0.005 0.01 0.05 0.1] [--triggers badnets blended] [--clean-seeds 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from robustdata.audit.features import extract_features  # noqa: E402
from robustdata.audit.metrics import confusion, detection_metrics  # noqa: E402
from robustdata.audit.scoring import run_audit  # noqa: E402
from robustdata.config import load_params  # noqa: E402
from robustdata.data.memory import InMemoryDataset, load_in_memory  # noqa: E402
from robustdata.io import code_version, write_json_atomic  # noqa: E402
from robustdata.train.models import layer_module  # noqa: E402
from robustdata.poison import backdoor  # noqa: E402
from robustdata.poison.base import Backdoor  # noqa: E402
from robustdata.poison.plant import Dose, plant, triggered_test_set  # noqa: E402
from robustdata.poison.targeting import Targeting  # noqa: E402
from robustdata.train.training import fit, generator_for, predict  # noqa: E402

log = Console(stderr=True)
wide = Console(width=230)  # the tables are wide; do not fold them to a pipe's 80 columns
TARGET = 0
TARGETING = Targeting("all_to_one", (TARGET,))


def accuracy(model, data: InMemoryDataset) -> float:
    return float((predict(model, data.images).cpu() == data.labels).float().mean())


def attack_success(model, test: InMemoryDataset, attack: Backdoor) -> float:
    triggered, target, _ = triggered_test_set(test.images, test.labels, attack, TARGETING, len(test.classes),
                                              torch.Generator())
    return float((predict(model, triggered).cpu() == target).float().mean())


def module_name(model, layer: str) -> str:
    module, _ = layer_module(model, layer)
    return next(name for name, m in model.named_modules() if m is module)


ALL_METHODS = ("filter", "spectre", "spectral", "clustering")


def audit_once(model, data: InMemoryDataset, truth: torch.Tensor, eps: float | None, audit, features,
               inputs, methods: tuple[str, ...] | None = None) -> dict[str, Any]:
    result = run_audit(features, inputs, data.labels.to(features.device), len(data.classes), eps=eps,
                       methods=methods or tuple(audit.methods), removal_method=audit.removal_method,
                       rank=audit.rank, filter_rank=audit.filter_rank, spectral_k=audit.spectral_k,
                       kappa=audit.kappa, eps_scope=audit.eps_scope,
                       generator=generator_for(audit.seed, features.device))
    budgets = {c["label"]: c["budget"] for c in result.classes}
    methods = {m: detection_metrics(result.scores[m], result.flagged[m], truth, data.labels, len(data.classes),
                                    budgets)["overall"] for m in result.scores}
    return {"result": result, "methods": methods, "scoring_seconds": result.seconds["scoring"],
            "poisoned_classes": [c["label"] for c in result.classes if c["poisoned"]],
            "estimated_poisons": {c["label"]: c["estimated_poisons"] for c in result.classes if c["poisoned"]}}


def retrain(data: InMemoryDataset, removed: torch.Tensor, val, test, params, attack) -> dict[str, Any]:
    keep = torch.nonzero(~removed.cpu()).flatten()
    filtered = InMemoryDataset(data.images[keep], data.labels[keep], [data.keys[i] for i in keep.tolist()],
                               data.classes)
    model, info = fit(filtered, val, params, progress=False)
    return {"train_samples": len(filtered), "clean_accuracy": accuracy(model, test),
            "asr": attack_success(model, test, attack), "train_seconds": info["train_seconds"]}


def run_art(model, data: InMemoryDataset, truth: torch.Tensor, eps: float, layer: str) -> dict[str, Any]:
    from art_reference import art_spectral_signatures

    art = art_spectral_signatures(model, data.images, data.labels, len(data.classes), eps, module_name(model, layer))
    flagged = torch.as_tensor(art["flagged"])
    return {**confusion(flagged, truth), "seconds": art["seconds_total"], "art_version": art["art_version"]}


def one_config(kind: str, rate: float, train, val, test, params, args) -> dict[str, Any]:
    planted = plant(train.images, train.labels, backdoor(kind), TARGETING, Dose(rate), len(train.classes),
                    torch.Generator().manual_seed(0))
    attack, images, labels, truth = planted.attack, planted.images, planted.labels, planted.is_poison
    data = InMemoryDataset(images, labels, train.keys, train.classes)
    suspect_params, audit = params.train_suspect, params.audit
    model, _ = fit(data, val, suspect_params, progress=False)
    entry: dict[str, Any] = {"trigger": attack.id, "rate": rate, "poisons": int(truth.sum()),
                             "target_class_fraction": float(truth.sum() / (labels == TARGET).sum()),
                             "suspect": {"clean_accuracy": accuracy(model, test),
                                         "asr": attack_success(model, test, attack)}}
    start = time.perf_counter()
    features = extract_features(model, data.images, audit.layer, batch_size=audit.batch_size)
    entry["inference_seconds"] = time.perf_counter() - start
    inputs = data.images.to(features.device).flatten(1).float().div_(255.0)
    eps = entry["target_class_fraction"]
    for mode, mode_eps in (("eps", eps), ("auto", None)):
        outcome = audit_once(model, data, truth, mode_eps, audit, features, inputs)
        compared = audit_once(model, data, truth, mode_eps, audit, features, inputs, ALL_METHODS)
        removed = outcome["result"].removed
        # the default run decides and is timed; the all-methods run only adds SPECTRE's column (its
        # PCA keeps 64 directions instead of 16, so its sketch, and a few borderline flags, differ)
        entry[mode] = {"methods": {**compared["methods"], **outcome["methods"]},
                       "scoring_seconds": outcome["scoring_seconds"],
                       "scoring_seconds_all_methods": compared["scoring_seconds"],
                       "scoring_fraction_of_inference": outcome["scoring_seconds"] / entry["inference_seconds"],
                       "poisoned_classes": outcome["poisoned_classes"],
                       "estimated_poisons": outcome["estimated_poisons"],
                       "retrained": retrain(data, removed, val, test, suspect_params, attack)}
        log.log(f"{attack.id} {rate:g} {mode}: {entry[mode]['methods'][audit.removal_method]} "
                f"retrained {entry[mode]['retrained']}")
    if not args.skip_art:
        entry["art"] = run_art(model, data, truth, eps, audit.layer)
        entry["ours_seconds"] = entry["inference_seconds"] + entry["eps"]["scoring_seconds"]
        entry["art_time_ratio"] = entry["art"]["seconds"] / entry["ours_seconds"]
    return entry


def clean_runs(train, val, test, params, seeds: list[int]) -> list[dict[str, Any]]:
    runs = []
    audit = params.audit
    for seed in seeds:
        model, _ = fit(train, val, params.train_suspect.model_copy(update={"seed": seed}), progress=False)
        features = extract_features(model, train.images, audit.layer, batch_size=audit.batch_size)
        inputs = train.images.to(features.device).flatten(1).float().div_(255.0)
        truth = torch.zeros(len(train), dtype=torch.bool)
        outcome = audit_once(model, train, truth, None, audit, features, inputs)
        runs.append({"seed": seed, "clean_accuracy": accuracy(model, test),
                     "poisoned_classes": outcome["poisoned_classes"],
                     "removed": int(outcome["result"].removed.sum()),
                     "separations": [c["statistic"] for c in outcome["result"].classes],
                     "threshold": outcome["result"].threshold})
        log.log(f"clean seed {seed}: {runs[-1]}")
    return runs


def percent(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def print_tables(report: dict[str, Any], removal: str) -> None:
    reference = report["clean_reference_accuracy"]
    table = Table(title=f"audit grid (removal method: {removal}); clean reference accuracy {percent(reference)}%")
    for column in ("trigger", "rate", "poisons", "mode", "recall %", "FPR %", "classes flagged", "ASR before %",
                   "ASR after %", "clean acc after %", "delta vs clean (pts)", "scoring / inference",
                   "spectre recall %", "spectral recall %", "AC recall %"):
        table.add_column(column, justify="right")
    for entry in report["grid"]:
        for mode in ("eps", "auto"):
            outcome = entry[mode]
            ours = outcome["methods"][removal]
            table.add_row(entry["trigger"], f"{entry['rate']:g}", str(entry["poisons"]), mode, percent(ours["tpr"]),
                          percent(ours["fpr"], 3), str(outcome["poisoned_classes"]),
                          percent(entry["suspect"]["asr"]), percent(outcome["retrained"]["asr"]),
                          percent(outcome["retrained"]["clean_accuracy"]),
                          f"{100 * (outcome['retrained']['clean_accuracy'] - reference):+.2f}",
                          f"{outcome['scoring_fraction_of_inference']:.3f}",
                          *(percent(outcome["methods"][m]["tpr"]) if m in outcome["methods"] else "-"
                            for m in ("spectre", "spectral", "clustering")))
    wide.print(table)
    if any("art" in e for e in report["grid"]):
        art = Table(title="IBM ART SpectralSignatureDefense vs ours (eps mode, same model, layer, data, eps)")
        for column in ("trigger", "rate", "ART recall %", "ART FPR %", "our recall %", "our FPR %", "ART s",
                       "our s (inference + scoring)", "ART / ours time"):
            art.add_column(column, justify="right")
        for entry in report["grid"]:
            if "art" in entry:
                ours = entry["eps"]["methods"][removal]
                art.add_row(entry["trigger"], f"{entry['rate']:g}", percent(entry["art"]["tpr"]),
                            percent(entry["art"]["fpr"], 3), percent(ours["tpr"]), percent(ours["fpr"], 3),
                            f"{entry['art']['seconds']:.1f}", f"{entry['ours_seconds']:.1f}",
                            f"{entry['art_time_ratio']:.2f}")
        wide.print(art)
    clean = Table(title="auto mode on clean training sets")
    for column in ("seed", "clean acc %", "classes flagged", "samples removed", "max separation", "threshold"):
        clean.add_column(column, justify="right")
    for run in report["clean_audits"]:
        clean.add_row(str(run["seed"]), percent(run["clean_accuracy"]), str(run["poisoned_classes"]),
                      str(run["removed"]), f"{max(s for s in run['separations'] if s is not None):.2f}",
                      f"{run['threshold']:.2f}")
    wide.print(clean)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.005, 0.01, 0.05, 0.10])
    parser.add_argument("--triggers", nargs="+", default=["badnets", "blended"], help="Backdoor attacks.")
    parser.add_argument("--clean-seeds", type=int, default=3)
    parser.add_argument("--skip-art", action="store_true", help="Leave IBM ART out (it is an optional extra).")
    parser.add_argument("--out", type=Path, default=REPO / "reports/bench/audit.json")
    args = parser.parse_args()
    params = load_params(args.params)
    root = REPO / params.ingest.out
    if not (root / "train" / "card.json").exists():
        sys.exit(f"error: {root} is missing; run `make run` (or `robustdata ingest`) first")
    train, val, test = (load_in_memory(root / split, progress=False) for split in ("train", "val", "test"))
    start = time.perf_counter()
    clean_audits = clean_runs(train, val, test, params, list(range(args.clean_seeds)))
    grid = [one_config(kind, rate, train, val, test, params, args) for kind in args.triggers for rate in args.rates]
    removal = params.audit.removal_method
    fractions = [e[m]["scoring_fraction_of_inference"] for e in grid for m in ("eps", "auto")]
    report = {
        "clean_reference_accuracy": clean_audits[0]["clean_accuracy"],
        "clean_audits": clean_audits, "grid": grid,
        "median_scoring_fraction_of_inference": statistics.median(fractions),
        "median_art_time_ratio": statistics.median([e["art_time_ratio"] for e in grid if "art_time_ratio" in e])
        if not args.skip_art else None,
        "params": {"train_suspect": params.train_suspect.model_dump(mode="json"),
                   "audit": params.audit.model_dump(mode="json")},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "seconds": time.perf_counter() - start, "built_by": code_version(),
    }
    for entry in grid:  # tensors stay out of the JSON
        for mode in ("eps", "auto"):
            entry[mode]["estimated_poisons"] = {str(k): v for k, v in entry[mode]["estimated_poisons"].items()}
    write_json_atomic(args.out, report)
    print_tables(report, removal)
    log.log(f"median scoring / inference {report['median_scoring_fraction_of_inference']:.3f}; "
            f"wrote {args.out}")


if __name__ == "__main__":
    main()

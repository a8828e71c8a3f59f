#!/usr/bin/env python
"""Benchmark (issue 19): the poisoning audit on MNIST and the small CNN, over attack x configuration x rate.

Each cell (an attack at given settings, a targeting and a rate) runs for every seed s (the poison seed and the
model seed): plant the poisons in the first --train-limit training images, train the suspect model
(params.yaml's train_suspect, seed s), measure its attack success rate (ASR: triggered source-class test
images classified as their target) and clean test accuracy, time one inference pass over the training set,
then run the rows side by side on the same model and data:
  audit         the eps-free audit under test (robustdata.audit.run.audit_dataset, eps None): verdicts,
                stated sensitivity, features + scoring time against the inference pass;
  spectral, spectre, clustering
                the baselines at their papers' 1.5 eps budget given the true eps (the largest poisoned
                fraction of any class), removed from every class (eps_scope all); activation clustering
                flags by its own rule;
  art_spectral, art_clustering
                IBM ART's SpectralSignatureDefense (true eps) and ActivationDefence (its defaults);
  random        a seeded uniform draw of as many samples as the audit removed;
  perfect       exactly the poisons (the ceiling, as the Armory benchmark reports it);
and retrain on each row's filtered set (same recipe and seed): ASR and clean accuracy after. A clean model
per seed (the same images, unpoisoned) is the clean-accuracy reference and, for --clean-seeds seeds, the
clean-data audit. The issue's targets are evaluated per cell and seed (with their margins) and summarised.

Resumable: one JSON per (cell, seed) under --work, with the planted set and the suspect's state_dict; a
rerun after an audit change (sha256 of robustdata/audit/**/*.py, and the audit params) recomputes the rows
only, and retraining is cached by the removed mask, so only rows whose flags changed retrain. The report
(--out, and a markdown table beside it) is rewritten after every (cell, seed) and covers every cell of the
core and full grids found in --work with the current audit, so it shows as much of the full grid as has run.

    python benchmarks/audit.py                                  # the core grid (14 cells x 3 seeds)
    python benchmarks/audit.py --grid full                      # 137 cells x 3 seeds: a day or more on 2 cores
    python benchmarks/audit.py --attacks badnets wanet --seeds 0
    python benchmarks/audit.py --spec '{"attack": "badnets", "rate": 0.01, "options": {"shape": "pixel"}}'
    python benchmarks/audit.py --report-only                    # tables and report from --work, no training

A spec is JSON, as in benchmarks/backdoors.py: attack, options (the attack's settings), targeting
(all_to_one | source_specific | multi_target | all_to_all), targets, sources, rate (dirty-label: of the
training set; clean-label: of the target class), cover_ratio (null: the attack's own).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from backdoors import default_spec, spec_id  # noqa: E402
from provenance import provenance  # noqa: E402

from robustdata.audit.metrics import confusion  # noqa: E402
from robustdata.audit.run import audit_dataset, stated_sensitivity  # noqa: E402
from robustdata.audit.sensitivity import LEARNED  # noqa: E402
from robustdata.audit.verdicts import INCONCLUSIVE, POISONED, overall_verdict  # noqa: E402
from robustdata.config import load_params  # noqa: E402
from robustdata.data.memory import InMemoryDataset, load_in_memory  # noqa: E402
from robustdata.io import read_json, write_bytes_atomic, write_json_atomic  # noqa: E402
from robustdata.poison import attack_names, backdoor  # noqa: E402
from robustdata.poison.plant import Dose, plant, triggered_test_set  # noqa: E402
from robustdata.poison.targeting import Targeting  # noqa: E402
from robustdata.train.models import layer_module  # noqa: E402
from robustdata.train.training import fit, predict, resolve_device, seeded_model  # noqa: E402

log = Console(stderr=True)
wide = Console(width=240)  # the tables are wide; do not fold them to a pipe's 80 columns

ROWS = ("audit", "spectral", "spectre", "clustering", "art_spectral", "art_clustering", "random", "perfect")
BASELINES = ("spectral", "spectre", "clustering")  # rows of the eps-given audit call
ART_ROWS = ("art_spectral", "art_clustering")
# rows whose flags read neither robustdata/audit nor its params but the layer (IBM ART's, the ground truth):
# an audit change keeps them (retraining would be cached anyway; ART's own scoring takes minutes per cell)
AUDIT_FREE_ROWS = ("art_spectral", "art_clustering", "perfect")
ADAPTIVE = ("adap_blend", "adap_patch")

# The targets (MNIST, small CNN). Rates are fractions, accuracies fractions (0.003 = 0.3 points).
LEARNED_ASR = 0.90          # the suspect learned the backdoor: ASR before the audit at least this
DIRTY_ASR_AFTER = 0.02      # dirty-label at rates >= LOW_RATE: ASR after retraining at most this
LOOSE_ASR_AFTER = 0.10      # rate below LOW_RATE, clean-label, adaptive: at most this, or inconclusive
CLEAN_ACC_DELTA = 0.003     # |clean accuracy after - the clean reference's| at most this
MAX_FPR = 0.01
MAX_TIME_RATIO = 2.0        # (features + scoring) / one inference pass over the training set
LOW_RATE = 0.005

# ------------------------------------------------------------------------------------------------ grids

TARGETINGS = {"all_to_one": ([0], []), "source_specific": ([0], [1]), "multi_target": ([0, 1], []),
              "all_to_all": ([], [])}
FULL_RATES = {"dirty": (0.001, 0.005, 0.01, 0.05, 0.1), "clean_label": (0.1, 0.3, 0.5),
              "adaptive": (0.003, 0.01, 0.05)}
# Trigger variants per attack; the first is the attack's default. Every variant runs all-to-one, the
# default one every targeting: the configurations of the full grid without multiplying variants by targetings.
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "badnets": [{}, {"shape": "pixel"}, {"shape": "checkerboard", "size": 2, "position": "random"}],
    "blended": [{}, {"pattern": "image"}],
}


def make_spec(attack: str, rate: float, targeting: str = "all_to_one", options: dict[str, Any] | None = None,
              targets: list[int] | None = None, sources: list[int] | None = None) -> dict[str, Any]:
    """A spec in backdoors.py's format (lists, not tuples: the spec id hashes its JSON)."""
    default_targets, default_sources = TARGETINGS[targeting]
    return {**default_spec(attack), "options": dict(options or {}), "targeting": targeting,
            "targets": list(default_targets if targets is None else targets),
            "sources": list(default_sources if sources is None else sources), "rate": rate}


def core_specs() -> list[dict[str, Any]]:
    """14 cells: every attack and every targeting at least once, badnets' pixel and blended's natural-image
    variants, and the 0.1% rate once (badnets' random-position checkerboard is in the full grid only)."""
    return [
        make_spec("badnets", 0.01),
        make_spec("badnets", 0.01, options={"shape": "pixel"}),
        make_spec("badnets", 0.001),
        make_spec("blended", 0.05),
        make_spec("blended", 0.05, options={"pattern": "image"}),
        make_spec("lf", 0.05),
        make_spec("wanet", 0.1),
        make_spec("badnets", 0.01, "source_specific"),
        make_spec("badnets", 0.02, "multi_target"),
        make_spec("badnets", 0.05, "all_to_all"),
        make_spec("sig", 0.3),
        make_spec("label_consistent", 0.3),
        make_spec("adap_blend", 0.01),
        make_spec("adap_patch", 0.01),
    ]


def category(attack: str) -> str:
    """dirty (dirty-label), clean_label or adaptive: which targets apply."""
    if attack in ADAPTIVE:
        return "adaptive"
    return "clean_label" if backdoor(attack).clean_label else "dirty"


def full_specs() -> list[dict[str, Any]]:
    """attack x configuration x rate (137 cells with the attacks of today)."""
    specs = []
    for attack in attack_names():
        kind = category(attack)
        variants = VARIANTS.get(attack, [{}])
        targetings = [t for t in TARGETINGS if not (kind == "clean_label" and t == "all_to_all")]
        configurations = [(options, "all_to_one") for options in variants]
        configurations += [(variants[0], t) for t in targetings if t != "all_to_one"]
        for options, targeting in configurations:
            specs += [make_spec(attack, rate, targeting, options) for rate in FULL_RATES[kind]]
    return specs


def user_spec(text: str) -> dict[str, Any]:
    """A --spec, completed: the attack's defaults, and the targeting's default classes (so a spec written
    out in part has the id of the same cell of a grid)."""
    given = json.loads(text)
    targets, sources = TARGETINGS.get(given.get("targeting", "all_to_one"), ([0], []))  # Targeting checks it
    return {**default_spec(given["attack"]), "targets": targets, "sources": sources, **given}


def selected_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    specs = [user_spec(text) for text in args.spec]
    grid = args.grid or (None if specs else "core")
    if grid is not None:
        specs += core_specs() if grid == "core" else full_specs()
    if args.attacks:
        specs = [s for s in specs if s["attack"] in args.attacks]
    unique = {spec_id(s): s for s in specs}
    return list(unique.values())


def target_classes(spec: dict[str, Any], num_classes: int) -> list[int]:
    """The classes the poisons are labelled with (all of them for all-to-all)."""
    return list(range(num_classes)) if spec["targeting"] == "all_to_all" else list(spec["targets"])


# ---------------------------------------------------------------------------------------- fingerprints


def sha256_tensors(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(str((array.dtype, array.shape)).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def audit_code_sha256() -> str:
    """Hash of the audit's code: a change recomputes every cell's rows (not its training). Comments and
    docstrings do not count (the hash is of each module's syntax tree without them), so documenting the
    audit does not throw away hours of rows."""
    package = REPO / "robustdata" / "audit"
    digest = hashlib.sha256()
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode())
        digest.update(code_only(source.read_text()).encode())
    return digest.hexdigest()


def code_only(source: str) -> str:
    """The module's syntax tree, dumped, without its docstrings (ast drops comments itself)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def recipe_for(params, seed: int):
    """train_suspect with the model seed; limit off (the benchmark cuts the training set itself)."""
    return params.train_suspect.model_copy(update={"seed": seed, "limit": None})


def recipe_json(recipe) -> dict[str, Any]:
    """The recipe fields that change a trained model (paths and the seed are keyed apart)."""
    return {k: v for k, v in recipe.model_dump(mode="json").items() if k not in ("data", "out", "seed")}


def retrain_key(removed: torch.Tensor, seed: int, recipe: dict[str, Any], train_limit: int, data_sha: str,
                triggered_sha: str) -> str:
    """What a retraining's result depends on: the removed mask, the seed, the recipe, the training set and the
    triggered test set (two specs that differ only in the test trigger plant the same training set)."""
    mask = np.packbits(removed.detach().cpu().numpy().astype(bool))
    return sha256_json({"mask": hashlib.sha256(mask.tobytes()).hexdigest(), "n": int(removed.numel()),
                        "seed": seed, "recipe": recipe, "train_limit": train_limit, "data": data_sha,
                        "triggered": triggered_sha})


# ------------------------------------------------------------------------------------- data and models


@dataclass
class Splits:
    train: InMemoryDataset  # the first --train-limit training images: every cell's training set
    val: InMemoryDataset
    test: InMemoryDataset

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)


@dataclass
class PlantedCell:
    data: InMemoryDataset       # the poisoned training set
    is_poison: torch.Tensor     # (N,) bool, CPU
    is_cover: torch.Tensor      # (N,) bool, CPU
    triggered: torch.Tensor     # (M, C, H, W) uint8: the triggered test set
    triggered_targets: torch.Tensor  # (M,) the labels the attack wants
    attack_id: str
    plant_seconds: float

    @cached_property
    def data_sha(self) -> str:
        return sha256_tensors(self.data.images, self.data.labels)

    @cached_property
    def triggered_sha(self) -> str:
        return sha256_tensors(self.triggered, self.triggered_targets)


def load_splits(params, train_limit: int) -> Splits:
    root = REPO / params.ingest.out
    if not (root / "train" / "card.json").exists():
        sys.exit(f"error: {root} is missing; run `make run` (or `robustdata ingest`) first")
    train, val, test = (load_in_memory(root / split, progress=False) for split in ("train", "val", "test"))
    train = InMemoryDataset(train.images[:train_limit], train.labels[:train_limit], train.keys[:train_limit],
                            train.classes)
    return Splits(train, val, test)


def save_tensors(path: Path, tensors: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def load_tensors(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code


def plant_cell(spec: dict[str, Any], seed: int, splits: Splits, path: Path) -> PlantedCell:
    """Plant the spec's poisons (poison seed `seed`) and build its triggered test set, cached at `path`: a
    rerun audits exactly the set its cached suspect model was trained on, even where planting itself would
    not repeat bit for bit (label_consistent trains a surrogate)."""
    train = splits.train
    if path.exists():
        saved = load_tensors(path)
        images, labels = train.images.clone(), saved["labels"]
        images[saved["changed"]] = saved["changed_images"]
        return PlantedCell(InMemoryDataset(images, labels, train.keys, train.classes), saved["is_poison"],
                           saved["is_cover"], saved["triggered"], saved["triggered_targets"], saved["attack_id"],
                           saved["plant_seconds"])
    targeting = Targeting(spec["targeting"], tuple(spec["targets"]), tuple(spec["sources"]))
    start = time.perf_counter()
    planted = plant(train.images, train.labels, backdoor(spec["attack"], spec["options"]), targeting,
                    Dose(spec["rate"], None, spec["cover_ratio"]), splits.num_classes,
                    torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - start
    triggered, targets, _ = triggered_test_set(splits.test.images, splits.test.labels, planted.attack, targeting,
                                               splits.num_classes, torch.Generator().manual_seed(seed))
    changed = torch.nonzero((planted.images != train.images).flatten(1).any(1)).flatten()
    save_tensors(path, {"labels": planted.labels.cpu(), "changed": changed, "changed_images": planted.images[changed],
                        "is_poison": planted.is_poison.cpu(), "is_cover": planted.is_cover.cpu(),
                        "triggered": triggered.cpu(), "triggered_targets": targets.cpu(),
                        "attack_id": planted.attack.id, "plant_seconds": seconds})
    return plant_cell(spec, seed, splits, path)  # read back: a fresh run and a resumed one see the same tensors


def restore_model(state: dict[str, torch.Tensor], recipe, data: InMemoryDataset) -> torch.nn.Module:
    """The trained model from its state_dict, in the memory format training leaves it in."""
    # seeded_model leaves torch's global generator alone; the weights drawn are overwritten anyway
    model = seeded_model(recipe.arch, len(data.classes), data.images.shape[1], data.images.shape[2], 0,
                         resolve_device(recipe.device))
    model.to(memory_format=torch.channels_last if recipe.channels_last else torch.contiguous_format)
    model.load_state_dict(state)
    return model.eval()


def trained_model(data: InMemoryDataset, val: InMemoryDataset, recipe, path: Path, key: str
                  ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train `recipe` on `data`, or load the state_dict saved at `path` when its key (data, recipe) matches."""
    sidecar = path.with_suffix(".json")
    if path.exists() and sidecar.exists() and read_json(sidecar).get("key") == key:
        meta = read_json(sidecar)
        return restore_model(load_tensors(path), recipe, data), {**meta, "cached": True}
    model, info = fit(data, val, recipe, progress=False)
    save_tensors(path, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    meta = {"key": key, "train_seconds": info["train_seconds"], "train_samples": info["train_samples"],
            "device": info["device"]}
    write_json_atomic(sidecar, meta)  # last: a state_dict without its sidecar is retrained
    return model, {**meta, "cached": False}


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict(model, images).cpu() == labels.cpu()).float().mean())


def inference_seconds(model: torch.nn.Module, images: torch.Tensor) -> float:
    """Wall time of one prediction pass over `images`, after a warm-up batch: a cold first call would
    inflate the yardstick the audit's time is held to."""
    predict(model, images[:1000])
    start = time.perf_counter()
    predict(model, images)
    return time.perf_counter() - start


def module_name(model: torch.nn.Module, layer: str) -> str:
    """The named_modules() name of an audit layer (ART hooks a module by its name)."""
    module, reads_input = layer_module(model, layer)
    if reads_input:  # ART hooks a module's output; this layer is the input of the model's last linear
        raise SystemExit(f"error: the audit layer {layer!r} of this model is a module's input, which ART cannot "
                         "read: set audit.layer to a module name, or give --skip-art")
    return next(name for name, m in model.named_modules() if m is module)


# ------------------------------------------------------------------------------------------------- rows


def is_array(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() != 1
    return isinstance(value, np.ndarray) and value.size != 1


def json_safe(value: Any) -> Any:
    """A JSON-ready copy: tensors of more than one element left out (a class's split direction), scalars
    unwrapped, non-finite floats as None."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items() if not is_array(v)}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return json_safe(value.item())
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def class_fractions(labels: torch.Tensor, is_poison: torch.Tensor, num_classes: int) -> list[float]:
    """Per class c: poisons labelled c / samples labelled c (Tran et al.'s eps is the largest)."""
    counts = torch.bincount(labels.cpu(), minlength=num_classes).clamp(min=1)
    poisons = torch.bincount(labels.cpu()[is_poison.cpu()], minlength=num_classes)
    return (poisons / counts).tolist()


def class_verdicts(result, num_classes: int) -> list[str]:
    """Each label's verdict, in label order (a label the audit did not report would be a bug: KeyError)."""
    verdict_of = {entry["label"]: entry["verdict"] for entry in result.classes}
    return [verdict_of[label] for label in range(num_classes)]


def audit_row(model, cell: PlantedCell, params, targets: list[int]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The eps-free audit under test: its removed samples, its verdicts and what it states about itself."""
    result = audit_dataset(model, cell.data, params.audit, eps=None)
    verdicts = class_verdicts(result, len(cell.data.classes))
    features, scoring = result.seconds["features"], result.seconds["scoring"]
    return result.removed.cpu(), {
        "overall_verdict": overall_verdict(verdicts), "class_verdicts": verdicts,
        "target_verdicts": {str(c): verdicts[c] for c in targets},
        "threshold": json_safe(result.threshold),
        "features_seconds": features, "scoring_seconds": scoring, "classes": json_safe(result.classes)}


def baseline_flags(model, cell: PlantedCell, params, eps: float, wanted: list[str]) -> dict[str, torch.Tensor]:
    """Spectral signatures, SPECTRE and activation clustering as their papers run them: eps known, 1.5 eps
    removed from every class (activation clustering flags by its own rule)."""
    audit = params.audit.model_copy(update={"eps_scope": "all"})
    methods = tuple(dict.fromkeys(("filter", *BASELINES, audit.removal_method)))
    result = audit_dataset(model, cell.data, audit, eps=eps, methods=methods)
    return {name: result.flagged[name].cpu() for name in wanted}


def art_flags(model, cell: PlantedCell, params, eps: float, seed: int, wanted: list[str]
              ) -> dict[str, tuple[torch.Tensor, dict[str, Any]]]:
    """IBM ART's defences on the same model, layer and data: (flags, what ART reports) per row."""
    from art_reference import art_activation_clustering, art_spectral_signatures

    layer = module_name(model, params.audit.layer)
    images, labels, classes = cell.data.images, cell.data.labels, len(cell.data.classes)
    out = {}
    if "art_spectral" in wanted:
        art = art_spectral_signatures(model, images, labels, classes, eps, layer)
        out["art_spectral"] = (torch.as_tensor(art["flagged"]),
                               {"art_seconds": art["seconds_total"], "art_version": art["art_version"]})
    if "art_clustering" in wanted:
        art = art_activation_clustering(model, images, labels, classes, layer, seed=seed)
        out["art_clustering"] = (torch.as_tensor(art["flagged"]),
                                 {"art_seconds": art["seconds_total"], "art_version": art["art_version"],
                                  "smaller_cluster_fraction": art["smaller_cluster_fraction"]})
    return out


RANDOM_ROW_STREAM = 1_000_003  # the random row's generator: seed + this, apart from the poison seed's stream


def random_flags(n: int, count: int, seed: int) -> torch.Tensor:
    """`count` of `n` samples drawn uniformly (the audit's removal size, with no knowledge)."""
    flags = torch.zeros(n, dtype=torch.bool)
    flags[torch.randperm(n, generator=torch.Generator().manual_seed(RANDOM_ROW_STREAM + seed))[:count]] = True
    return flags


def retrained(cell: PlantedCell, removed: torch.Tensor, seed: int, splits: Splits, params, work: Path,
              suspect: dict[str, Any]) -> dict[str, Any]:
    """ASR and clean accuracy of the recipe retrained on the set without `removed`, cached by retrain_key.
    Nothing removed is the suspect's own training (same data, seed and recipe): its numbers, no retraining."""
    count = int(removed.sum())
    if count == 0:
        return {"removed": 0, "asr": suspect["asr"], "clean_accuracy": suspect["clean_accuracy"],
                "retrained": False, "note": "nothing removed: the suspect model is the retrained model"}
    recipe = recipe_for(params, seed)
    key = retrain_key(removed, seed, recipe_json(recipe), len(splits.train), cell.data_sha, cell.triggered_sha)
    path = work / "retrain" / f"{key}.json"
    if path.exists():
        return {**read_json(path), "cached": True}
    keep = torch.nonzero(~removed).flatten()
    data = cell.data
    filtered = InMemoryDataset(data.images[keep], data.labels[keep], [data.keys[i] for i in keep.tolist()],
                               data.classes)
    model, info = fit(filtered, splits.val, recipe, progress=False)
    result = {"key": key, "removed": count, "train_samples": len(filtered), "retrained": True,
              "clean_accuracy": accuracy(model, splits.test.images, splits.test.labels),
              "asr": accuracy(model, cell.triggered, cell.triggered_targets), "train_seconds": info["train_seconds"]}
    write_json_atomic(path, result)
    return {**result, "cached": False}


def row_entry(flags: torch.Tensor, cell: PlantedCell, retrain: dict[str, Any]) -> dict[str, Any]:
    """Detection (covers count as negatives: they keep their true labels) and the retrained model's numbers."""
    counts = confusion(flags.cpu(), cell.is_poison)
    return {"flagged": int(flags.sum()), "tp": counts["tp"], "fp": counts["fp"], "recall": counts["tpr"],
            "fpr": counts["fpr"], "precision": counts["precision"], "asr_after": retrain["asr"],
            "clean_after": retrain["clean_accuracy"],
            "retrain": {k: v for k, v in retrain.items() if k not in ("asr", "clean_accuracy")}}


def compute_rows(model, cell: PlantedCell, spec: dict[str, Any], seed: int, splits: Splits, params,
                 wanted: list[str], work: Path, suspect: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every wanted row's flags, detection metrics and retrained model; and the audit's own report."""
    targets = target_classes(spec, splits.num_classes)
    removed, audit_info = audit_row(model, cell, params, targets)
    eps = max(class_fractions(cell.data.labels, cell.is_poison, splits.num_classes))
    flags: dict[str, torch.Tensor] = {"audit": removed}
    extras: dict[str, dict[str, Any]] = {}
    if any(name in wanted for name in BASELINES):
        flags.update(baseline_flags(model, cell, params, eps, [n for n in BASELINES if n in wanted]))
    if any(name in wanted for name in ART_ROWS):
        for name, (art, extra) in art_flags(model, cell, params, eps, seed, wanted).items():
            flags[name], extras[name] = art, extra
    if "random" in wanted:
        flags["random"] = random_flags(len(cell.data), int(removed.sum()), seed)
    if "perfect" in wanted:
        flags["perfect"] = cell.is_poison.clone()
    rows = {}
    for name in [n for n in ROWS if n in flags]:
        retrain = retrained(cell, flags[name], seed, splits, params, work, suspect)
        rows[name] = {**row_entry(flags[name], cell, retrain), **extras.get(name, {})}
        log.log(f"  {name}: flagged {rows[name]['flagged']} recall {fmt_rate(rows[name]['recall'])} "
                f"FPR {fmt_rate(rows[name]['fpr'])} ASR after {fmt_rate(rows[name]['asr_after'])} "
                f"clean after {fmt_rate(rows[name]['clean_after'])}"
                f"{' (cached)' if retrain.get('cached') else ''}")
    return rows, audit_info


def fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def planted_summary(cell: PlantedCell, spec: dict[str, Any], num_classes: int) -> dict[str, Any]:
    fractions = class_fractions(cell.data.labels, cell.is_poison, num_classes)
    targets = target_classes(spec, num_classes)
    return {"poisons": int(cell.is_poison.sum()), "covers": int(cell.is_cover.sum()), "class_fractions": fractions,
            "eps": max(fractions), "target_fractions": {str(c): fractions[c] for c in targets},
            "triggered_test_images": len(cell.triggered), "plant_seconds": cell.plant_seconds,
            "data_sha256": cell.data_sha, "triggered_sha256": cell.triggered_sha}


@dataclass
class Context:
    """What every cell shares."""
    splits: Splits
    params: Any
    rows: list[str]              # the rows asked for (the audit always among them)
    work: Path                   # this setup's work directory
    fingerprint: dict[str, Any]  # the audit code and params: the rows are recomputed when it changes
    sensitivity_rounds: int      # canary rounds per seed stating the audit's sensitivity (0: none)
    stated: dict[int, float | None] = field(default_factory=dict)  # seed -> the sensitivity stated on its clean set


def cell_path(work: Path, spec: dict[str, Any], seed: int) -> Path:
    return work / "cells" / f"{spec_id(spec)}-seed{seed}"


def run_cell(spec: dict[str, Any], seed: int, ctx: Context, clean_reference: float) -> dict[str, Any]:
    """One (cell, seed), from its JSON when the audit is unchanged and it holds every row asked for."""
    folder = cell_path(ctx.work, spec, seed)
    path = folder / "cell.json"
    previous = read_json(path) if path.exists() else None
    fresh = previous is not None and previous["fingerprint"] == ctx.fingerprint
    if fresh and set(ctx.rows) <= set(previous["rows"]):
        return previous
    start = time.perf_counter()
    splits, params = ctx.splits, ctx.params
    cell = plant_cell(spec, seed, splits, folder / "planted.pt")
    recipe = recipe_for(params, seed)
    key = sha256_json({"data": cell.data_sha, "recipe": recipe_json(recipe), "seed": seed})
    model, meta = trained_model(cell.data, splits.val, recipe, folder / "suspect.pt", key)
    suspect = {**meta, "clean_accuracy": accuracy(model, splits.test.images, splits.test.labels),
               "asr": accuracy(model, cell.triggered, cell.triggered_targets)}
    log.log(f"{cell.attack_id} {spec['targeting']} rate {spec['rate']:g} seed {seed}: suspect ASR "
            f"{fmt_rate(suspect['asr'])} clean {fmt_rate(suspect['clean_accuracy'])}")
    inference = inference_seconds(model, cell.data.images)
    kept = previous["rows"] if fresh else audit_free_rows(previous, key, params.audit.layer)
    wanted = [name for name in ctx.rows if name == "audit" or name not in kept]
    rows, audit_info = compute_rows(model, cell, spec, seed, splits, params, wanted, ctx.work, suspect)
    rows = {**{name: row for name, row in kept.items() if name not in rows}, **rows}  # rows computed before stay
    audit_info["inference_seconds"] = inference
    audit_info["sensitivity"] = ctx.stated.get(seed)
    audit_info["time_ratio"] = (audit_info["features_seconds"] + audit_info["scoring_seconds"]) / inference
    result = {"spec": spec, "cell_id": spec_id(spec), "seed": seed, "attack_id": cell.attack_id,
              "category": category(spec["attack"]), "fingerprint": ctx.fingerprint,
              "planted": planted_summary(cell, spec, splits.num_classes), "suspect": suspect,
              "clean_reference": {"seed": seed, "clean_accuracy": clean_reference},
              "audit": audit_info, "rows": rows, "seconds": time.perf_counter() - start}
    result["targets"] = evaluate_targets(result)
    write_json_atomic(path, result)
    log.log(f"  {result['seconds']:.0f} s; verdict {audit_info['overall_verdict']}, target classes "
            f"{audit_info['target_verdicts']}")
    return result


def audit_free_rows(previous: dict[str, Any] | None, suspect_key: str, layer: str) -> dict[str, Any]:
    """The rows of a cell's earlier run that no change to the audit touches (AUDIT_FREE_ROWS), while the
    suspect model (its data, recipe and seed: `suspect_key`) and the layer they read are the same."""
    if previous is None or previous["suspect"].get("key") != suspect_key:
        return {}
    if previous["fingerprint"]["audit_params"]["layer"] != layer:
        return {}
    return {name: row for name, row in previous["rows"].items() if name in AUDIT_FREE_ROWS}


def clean_run(seed: int, ctx: Context, train_missing: bool = True, state: bool = True) -> dict[str, Any] | None:
    """The model trained on the unpoisoned set (seed `seed`): the clean-accuracy reference, and the
    eps-free audit of clean data (no class may come out poisoned or inconclusive). None when it has not
    run and `train_missing` is off (--report-only). `state`: measure the audit's sensitivity on it too (the seeds
    whose cells are checked against it)."""
    folder = ctx.work / "clean" / f"seed{seed}"
    path = folder / "audit.json"  # beside model.pt and its sidecar model.json
    if path.exists() and read_json(path)["fingerprint"] == ctx.fingerprint:
        entry = read_json(path)
        measured = (entry.get("sensitivity") or {}).get("rounds", 0) == ctx.sensitivity_rounds
        if not train_missing or not state or measured:
            return entry
        entry["sensitivity"] = measured_sensitivity(seed, ctx)
        write_json_atomic(path, entry)
        return entry
    if not train_missing:
        return None
    splits, recipe = ctx.splits, recipe_for(ctx.params, seed)
    key = sha256_json({"data": sha256_tensors(splits.train.images, splits.train.labels),
                       "recipe": recipe_json(recipe), "seed": seed})
    model, meta = trained_model(splits.train, splits.val, recipe, folder / "model.pt", key)
    inference = inference_seconds(model, splits.train.images)
    result = audit_dataset(model, splits.train, ctx.params.audit, eps=None)
    verdicts = class_verdicts(result, splits.num_classes)
    seconds = result.seconds["features"] + result.seconds["scoring"]
    entry = {"seed": seed, "fingerprint": ctx.fingerprint, "model": meta,
             "clean_accuracy": accuracy(model, splits.test.images, splits.test.labels),
             "overall_verdict": overall_verdict(verdicts), "class_verdicts": verdicts,
             "removed": int(result.removed.sum()), "sensitivity": measured_sensitivity(seed, ctx) if state else None,
             "features_seconds": result.seconds["features"], "scoring_seconds": result.seconds["scoring"],
             "inference_seconds": inference, "time_ratio": seconds / inference, "classes": json_safe(result.classes)}
    entry["targets"] = clean_targets(entry)
    write_json_atomic(path, entry)
    log.log(f"clean seed {seed}: clean accuracy {fmt_rate(entry['clean_accuracy'])}, verdict "
            f"{entry['overall_verdict']}, removed {entry['removed']}")
    return entry


def measured_sensitivity(seed: int, ctx: Context) -> dict[str, Any] | None:
    """The audit's stated sensitivity on the clean set of `seed` (robustdata/audit/sensitivity.py): the same
    recipe, --sensitivity-rounds canary rounds."""
    if ctx.sensitivity_rounds == 0:
        return None
    stated = stated_sensitivity(ctx.splits.train, ctx.splits.val, recipe_for(ctx.params, seed),
                                ctx.params.audit.model_copy(update={"seed": seed}), ctx.sensitivity_rounds)
    log.log(f"clean seed {seed}: sensitivity {fmt_rate(stated['fraction'])} of a class "
            f"({stated['trials_at_or_above']} trials at or above, {stated['seconds']:.0f} s)")
    return json_safe(stated)


# ---------------------------------------------------------------------------------------------- targets


def check(met: bool | None, value: Any, limit: Any, margin: float | None, **detail: Any) -> dict[str, Any]:
    """One target's outcome. margin: how far inside the limit (negative: by how much it is missed), so a
    target met by a hair reads differently from one met by far."""
    return {"met": met, "value": value, "limit": limit, "margin": margin, **detail}


def asr_check(asr_after: float, asr_before: float, limit: float, inconclusive: bool | None) -> dict[str, Any]:
    """ASR after <= limit, or (where the issue allows it, inconclusive not None) a target class reported
    inconclusive. `via` says which held; `vacuous` that the suspect never learned the attack beyond the
    limit, so retraining had nothing to remove."""
    by_asr = asr_after <= limit
    met = by_asr or bool(inconclusive)
    via = "asr" if by_asr else ("inconclusive" if met else None)
    return check(met, asr_after, limit, limit - asr_after, via=via, vacuous=asr_before <= limit,
                 inconclusive_allowed=inconclusive is not None)


def sensitivity_check(audit: dict[str, Any], planted: dict[str, Any], asr_before: float) -> dict[str, Any]:
    """In every cell where a target class's poisoned fraction is at or above the sensitivity the audit states,
    that class's verdict must be poisoned. margin: the smallest such fraction minus the sensitivity. Not
    evaluated where the suspect did not learn the attack: the statement counts only canaries a model learned
    (attack success above sensitivity.LEARNED), and an unlearned backdoor is nothing to detect."""
    stated = audit.get("sensitivity")
    if stated is None:
        return check(None, None, None, None, note="the audit states no sensitivity")
    if asr_before <= LEARNED:
        return check(None, asr_before, LEARNED, None, note="the attack was not learned: no backdoor to detect")
    above = {c: f for c, f in planted["target_fractions"].items() if f >= stated}
    if not above:
        return check(None, max(planted["target_fractions"].values()), stated, None,
                     note="every target class is below the stated sensitivity")
    verdicts = {c: audit["target_verdicts"][c] for c in above}
    return check(all(v == POISONED for v in verdicts.values()), min(above.values()), stated,
                 min(above.values()) - stated, verdicts=verdicts)


def evaluate_targets(cell: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's targets for one (cell, seed) of the audit row; only those that apply to the cell."""
    spec, audit, row = cell["spec"], cell["audit"], cell["rows"]["audit"]
    asr_before, asr_after = cell["suspect"]["asr"], row["asr_after"]
    verdicts = audit["target_verdicts"]
    inconclusive = INCONCLUSIVE in verdicts.values()
    strict = cell["category"] == "dirty" and spec["rate"] >= LOW_RATE - 1e-12
    targets = {"learned": check(asr_before >= LEARNED_ASR, asr_before, LEARNED_ASR, asr_before - LEARNED_ASR)}
    if strict:
        targets["asr_after"] = asr_check(asr_after, asr_before, DIRTY_ASR_AFTER, None)
        delta = row["clean_after"] - cell["clean_reference"]["clean_accuracy"]
        targets["clean_accuracy"] = check(abs(delta) <= CLEAN_ACC_DELTA, delta, CLEAN_ACC_DELTA,
                                          CLEAN_ACC_DELTA - abs(delta))
        targets["fpr"] = check(row["fpr"] <= MAX_FPR, row["fpr"], MAX_FPR, MAX_FPR - row["fpr"])
    else:
        targets["asr_after"] = asr_check(asr_after, asr_before, LOOSE_ASR_AFTER, inconclusive)
    clean_targets = [c for c, v in verdicts.items() if v == "clean"]
    targets["never_clean"] = check(not (clean_targets and asr_after > LOOSE_ASR_AFTER), asr_after, LOOSE_ASR_AFTER,
                                   LOOSE_ASR_AFTER - asr_after if clean_targets else None,
                                   clean_target_classes=clean_targets)
    targets["sensitivity"] = sensitivity_check(audit, cell["planted"], asr_before)
    ratio = audit["time_ratio"]
    targets["time"] = check(ratio <= MAX_TIME_RATIO, ratio, MAX_TIME_RATIO, MAX_TIME_RATIO - ratio)
    return targets


def clean_targets(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Clean data: no poisoned or inconclusive verdict; and the time target."""
    flagged = [c for c, v in enumerate(entry["class_verdicts"]) if v != "clean"]
    ratio = entry["time_ratio"]
    return {"clean_verdict": check(entry["overall_verdict"] == "clean", entry["overall_verdict"], "clean", None,
                                   classes_not_clean=flagged),
            "time": check(ratio <= MAX_TIME_RATIO, ratio, MAX_TIME_RATIO, MAX_TIME_RATIO - ratio)}


def targeting_label(spec: dict[str, Any]) -> str:
    """e.g. "source_specific [1]->0"."""
    targets = spec["targets"][0] if len(spec["targets"]) == 1 else spec["targets"]
    sources = spec["sources"] if spec["targeting"] == "source_specific" else ""
    where = "y->y+1" if spec["targeting"] == "all_to_all" else f"{sources}->{targets}"
    return f"{spec['targeting']} {where}"


def cell_label(cell: dict[str, Any]) -> str:
    return f"{cell['attack_id']} {targeting_label(cell['spec'])} {100 * cell['spec']['rate']:g}%"


def targets_summary(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per target: evaluations met / evaluated (a (cell, seed) or a clean seed each), cells met in every
    seed / cells evaluated, how many were met only vacuously or through an inconclusive verdict, the
    smallest margin, and the failing ones."""
    summary: dict[str, dict[str, Any]] = {}
    per_cell: dict[str, dict[str, list[bool]]] = {}
    for entry in entries:
        is_cell = "spec" in entry
        where = f"{cell_label(entry)} seed {entry['seed']}" if is_cell else f"clean seed {entry['seed']}"
        group = entry["cell_id"] if is_cell else "clean"
        for target, outcome in entry["targets"].items():
            s = summary.setdefault(target, {"evaluated": 0, "met": 0, "not_evaluated": 0, "vacuous": 0,
                                            "via_inconclusive": 0, "min_margin": None, "failing": [],
                                            "cells_evaluated": 0, "cells_met": 0})
            if outcome["met"] is None:
                s["not_evaluated"] += 1
                continue
            tally(s, outcome)
            if not outcome["met"]:
                s["failing"].append(f"{where} ({group}): {fmt_value(outcome['value'])}")
            per_cell.setdefault(target, {}).setdefault(group, []).append(bool(outcome["met"]))
    for target, cells in per_cell.items():
        summary[target]["cells_evaluated"] = len(cells)
        summary[target]["cells_met"] = sum(all(seeds) for seeds in cells.values())
    return summary


def tally(counts: dict[str, Any], outcome: dict[str, Any]) -> None:
    """Count one evaluated target outcome (met is not None) into `counts`: evaluated, met, vacuous,
    via_inconclusive and the smallest margin."""
    counts["evaluated"] += 1
    counts["met"] += bool(outcome["met"])
    counts["vacuous"] += bool(outcome["met"] and outcome.get("vacuous"))
    counts["via_inconclusive"] += outcome.get("via") == "inconclusive"
    if outcome["margin"] is not None:
        counts["min_margin"] = outcome["margin"] if counts["min_margin"] is None else min(counts["min_margin"],
                                                                                          outcome["margin"])


def fmt_value(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------------ aggregation

ROW_METRICS = ("flagged", "recall", "fpr", "asr_after", "clean_after")


def stats(values: list[float | None]) -> dict[str, Any]:
    """mean ± std over seeds with n (std None for one seed: never a "± 0")."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": []}
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "values": values}


def aggregate(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell over its seeds: every row's metrics as mean ± std, verdict counts, targets met per seed."""
    rows = {}
    for name in ROWS:
        present = [s for s in seeds if name in s["rows"]]
        if present:
            rows[name] = {m: stats([s["rows"][name][m] for s in present]) for m in ROW_METRICS}
            rows[name]["clean_delta"] = stats([s["rows"][name]["clean_after"] - s["clean_reference"]["clean_accuracy"]
                                               for s in present])
    targets: dict[str, dict[str, Any]] = {}
    for seed in seeds:
        for name, outcome in seed["targets"].items():
            t = targets.setdefault(name, {"met": 0, "evaluated": 0, "min_margin": None, "vacuous": 0,
                                          "via_inconclusive": 0})
            if outcome["met"] is not None:
                tally(t, outcome)
    return {"n": len(seeds), "seeds": [s["seed"] for s in seeds],
            "asr_before": stats([s["suspect"]["asr"] for s in seeds]),
            "clean_before": stats([s["suspect"]["clean_accuracy"] for s in seeds]),
            "clean_reference": stats([s["clean_reference"]["clean_accuracy"] for s in seeds]),
            "verdicts": dict(Counter(s["audit"]["overall_verdict"] for s in seeds)),
            "target_verdicts": dict(Counter(v for s in seeds for v in s["audit"]["target_verdicts"].values())),
            "sensitivity": stats([s["audit"].get("sensitivity") for s in seeds]),
            "time_ratio": stats([s["audit"]["time_ratio"] for s in seeds]), "rows": rows, "targets": targets}


def grid_ids() -> dict[str, list[str]]:
    return {"core": [spec_id(s) for s in core_specs()], "full": [spec_id(s) for s in full_specs()]}


def gather_cells(ctx: Context, specs: list[dict[str, Any]]) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Every (cell, seed) JSON of these specs under the work directory that the current audit made, by cell
    id (targets re-evaluated, and rewritten where their definition changed); and those left stale by an
    audit change."""
    cells: dict[str, list[dict[str, Any]]] = {}
    stale = []
    for spec in specs:
        for path in sorted((ctx.work / "cells").glob(f"{spec_id(spec)}-seed*/cell.json")):
            cell = read_json(path)
            if cell["fingerprint"] != ctx.fingerprint:
                stale.append(f"{spec_id(spec)} seed {cell['seed']}")
                continue
            stated = ctx.stated.get(cell["seed"])
            targets = evaluate_targets({**cell, "audit": {**cell["audit"], "sensitivity": stated}})
            if targets != cell.get("targets") or stated != cell["audit"].get("sensitivity"):
                cell["targets"], cell["audit"]["sensitivity"] = targets, stated
                write_json_atomic(path, cell)
            cells.setdefault(spec_id(spec), []).append(cell)
    for seeds in cells.values():
        seeds.sort(key=lambda c: c["seed"])
    return cells, stale


def build_report(args: argparse.Namespace, ctx: Context, selected: list[dict[str, Any]],
                 clean: list[dict[str, Any]], started: float) -> dict[str, Any]:
    """The whole report: the cells asked for and every cell of the core and full grids found under --work."""
    ids = grid_ids()
    known = {spec_id(s): s for s in [*selected, *core_specs(), *full_specs()]}
    cells, stale = gather_cells(ctx, list(known.values()))
    order = [*ids["core"], *ids["full"], *(i for i in known if i not in ids["core"] and i not in ids["full"])]
    entries = []
    for cell_id in dict.fromkeys(order):
        if cell_id in cells:
            seeds = cells[cell_id]
            entries.append({"cell_id": cell_id, "spec": known[cell_id], "label": cell_label(seeds[0]),
                            "category": seeds[0]["category"], "attack_id": seeds[0]["attack_id"],
                            "grids": [g for g, members in ids.items() if cell_id in members] or ["custom"],
                            "aggregate": aggregate(seeds), "seeds": seeds})
    done = {(c["cell_id"], s["seed"]) for c in entries for s in c["seeds"]}
    pending = [f"{spec_id(s)} seed {seed}" for s in selected for seed in args.seeds if (spec_id(s), seed) not in done]
    seeds_of = {name: [s for c in entries if name in c["grids"] for s in c["seeds"]]
                for name in ("core", "full", "custom")}
    grids = {name: {"cells": len(members), "cells_run": sum(cid in cells for cid in members),
                    "cell_seeds_run": sum(len(cells.get(cid, [])) for cid in members)} for name, members in ids.items()}
    return {
        **provenance("audit"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "params": {"train_suspect": ctx.params.train_suspect.model_dump(mode="json"),
                   "audit": ctx.params.audit.model_dump(mode="json")},
        "setup": {"train_limit": len(ctx.splits.train), "work": str(ctx.work), "fingerprint": ctx.fingerprint,
                  "rows": ctx.rows},
        "target_limits": {"learned_asr": LEARNED_ASR, "dirty_asr_after": DIRTY_ASR_AFTER,
                          "loose_asr_after": LOOSE_ASR_AFTER, "clean_accuracy_delta": CLEAN_ACC_DELTA,
                          "max_fpr": MAX_FPR, "max_time_ratio": MAX_TIME_RATIO, "low_rate": LOW_RATE},
        "grids": grids, "pending": pending, "stale": stale,
        "clean_reference": {str(c["seed"]): c["clean_accuracy"] for c in clean},
        "clean_audits": clean,
        "targets": {"all": targets_summary([*(s for c in entries for s in c["seeds"]), *clean]),
                    **{name: targets_summary(found) for name, found in seeds_of.items() if found},
                    "clean_data": targets_summary(clean)},
        "cells": entries, "seconds": time.perf_counter() - started,
    }


def write_report(args: argparse.Namespace, ctx: Context, selected: list[dict[str, Any]],
                 clean: list[dict[str, Any]], started: float) -> dict[str, Any]:
    report = build_report(args, ctx, selected, clean, started)
    write_json_atomic(args.out, report)
    write_bytes_atomic(args.out.with_suffix(".md"), markdown(report).encode())
    return report


# ---------------------------------------------------------------------------------------------- tables


def fmt_stats(st: dict[str, Any], scale: float = 100, digits: int = 2, sign: bool = False) -> str:
    """mean ± std (one seed: the value alone; the n column says n = 1)."""
    if not st["n"]:
        return "-"
    spec = f"{'+' if sign else ''}.{digits}f"
    text = format(scale * st["mean"], spec)
    return text if st["std"] is None else f"{text} ± {scale * st['std']:.{digits}f}"


def fmt_counts(counts: dict[str, int]) -> str:
    return " ".join(f"{verdict[0].upper()}{n}" for verdict, n in sorted(counts.items())) or "-"


TARGET_SCALE = {"time": 1.0}  # margins of every other target are fractions, shown in points


def fmt_target(t: dict[str, Any] | None, name: str) -> str:
    """'met/evaluated (smallest margin)', v: some met only vacuously, i: some only through inconclusive."""
    if t is None or not t["evaluated"]:
        return "-"
    mark = ("" if t["met"] == t["evaluated"] else " ✗") + (" v" if t["vacuous"] else "") + \
        (" i" if t["via_inconclusive"] else "")
    margin = "" if t["min_margin"] is None else f" ({TARGET_SCALE.get(name, 100) * t['min_margin']:+.2f})"
    return f"{t['met']}/{t['evaluated']}{margin}{mark}"


def row_table(report: dict[str, Any], row: str) -> Table | None:
    cells = [c for c in report["cells"] if row in c["aggregate"]["rows"]]
    if not cells:
        return None
    table = Table(title=f"row {row}: mean ± std over seeds (%; clean Δ: points against the clean model of each seed)")
    columns = ["cell", "grid", "n", "ASR before", "flagged", "recall", "FPR", "ASR after", "clean after", "clean Δ"]
    columns += ["verdicts", "target classes", "time / inference"] if row == "audit" else []
    for column in columns:
        table.add_column(column, justify="left" if column == "cell" else "right")
    for cell in cells:
        agg, metrics = cell["aggregate"], cell["aggregate"]["rows"][row]
        values = [cell["label"], ",".join(cell["grids"]), str(agg["n"]), fmt_stats(agg["asr_before"]),
                  fmt_stats(metrics["flagged"], 1, 0), fmt_stats(metrics["recall"]),
                  fmt_stats(metrics["fpr"], digits=3),
                  fmt_stats(metrics["asr_after"]), fmt_stats(metrics["clean_after"]),
                  fmt_stats(metrics["clean_delta"], sign=True)]
        if row == "audit":
            values += [fmt_counts(agg["verdicts"]), fmt_counts(agg["target_verdicts"]), fmt_stats(agg["time_ratio"], 1)]
        table.add_row(*values)
    return table


TARGET_NAMES = ("learned", "asr_after", "clean_accuracy", "fpr", "never_clean", "sensitivity", "time")


def targets_tables(report: dict[str, Any]) -> list[Table]:
    per_cell = Table(title="targets per cell: met/evaluated seeds (smallest margin: points, time: ratio units); ✗ "
                           "missed, v met only vacuously (never learned), i met only through an inconclusive verdict")
    for column in ("cell", "n", *TARGET_NAMES):
        per_cell.add_column(column, justify="left" if column == "cell" else "right")
    for cell in report["cells"]:
        targets = cell["aggregate"]["targets"]
        per_cell.add_row(cell["label"], str(cell["aggregate"]["n"]),
                         *(fmt_target(targets.get(n), n) for n in TARGET_NAMES))
    summary = Table(title="targets summary (all cells and clean seeds found; per grid in the JSON)")
    for column in ("target", "met / evaluated", "cells met / evaluated", "vacuous", "via inconclusive",
                   "not evaluated", "failing (first 3)"):
        summary.add_column(column, justify="left" if column in ("target", "failing (first 3)") else "right")
    for name, s in report["targets"]["all"].items():
        more = f" (+{len(s['failing']) - 3} more)" if len(s["failing"]) > 3 else ""
        summary.add_row(name, f"{s['met']}/{s['evaluated']}", f"{s['cells_met']}/{s['cells_evaluated']}",
                        str(s["vacuous"]), str(s["via_inconclusive"]), str(s["not_evaluated"]),
                        "; ".join(s["failing"][:3]) + more)
    return [per_cell, summary]


def clean_table(report: dict[str, Any]) -> Table:
    table = Table(title="clean data (the unpoisoned training set), the eps-free audit per model seed")
    for column in ("seed", "clean acc %", "verdict", "classes not clean", "removed", "sensitivity",
                   "time / inference"):
        table.add_column(column, justify="right")
    for run in report["clean_audits"]:
        not_clean = [c for c, v in enumerate(run["class_verdicts"]) if v != "clean"]
        table.add_row(str(run["seed"]), f"{100 * run['clean_accuracy']:.2f}", run["overall_verdict"],
                      str(not_clean or "-"), str(run["removed"]),
                      fmt_sensitivity(run.get("sensitivity")),
                      f"{run['time_ratio']:.2f}")
    return table


def fmt_sensitivity(stated: dict[str, Any] | None) -> str:
    """"1.00% (16/16, >= 83%)": the stated fraction, the trials at or above it, the 95% lower bound."""
    if stated is None:
        return "-"
    if stated["fraction"] is None:
        return "none"
    n = stated["trials_at_or_above"]
    return f"{fmt_rate(stated['fraction'])} ({n}/{n}, >= {fmt_rate(stated['lower_95'])})"


def print_tables(report: dict[str, Any]) -> None:
    for row in ROWS:
        table = row_table(report, row)
        if table is not None:
            wide.print(table)
    for table in [*targets_tables(report), clean_table(report)]:
        wide.print(table)
    grids = ", ".join(f"{name} {g['cells_run']}/{g['cells']} cells ({g['cell_seeds_run']} cell-seeds)"
                      for name, g in report["grids"].items())
    log.log(f"found: {grids}; pending in this run: {len(report['pending'])}; stale (audit changed): "
            f"{len(report['stale'])}")


# -------------------------------------------------------------------------------------------- markdown


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def targets_met(targets: dict[str, dict[str, Any]]) -> str:
    """Targets met in every seed / targets that apply; the missed ones by name, and those met only by the
    letter (vacuously: the attack was never learned; or through an inconclusive verdict)."""
    applied = {n: t for n, t in targets.items() if t["evaluated"]}
    missed = [n for n, t in applied.items() if t["met"] < t["evaluated"]]
    notes = [f"missed: {', '.join(missed)}"] if missed else []
    notes += [f"{n} vacuous in {t['vacuous']}" for n, t in applied.items() if t["vacuous"]]
    notes += [f"{n} via inconclusive in {t['via_inconclusive']}" for n, t in applied.items() if t["via_inconclusive"]]
    return f"{len(applied) - len(missed)}/{len(applied)}" + (f" ({'; '.join(notes)})" if notes else "")


def markdown(report: dict[str, Any]) -> str:
    """Per-attack tables for the README: the audit row, ASR after retraining per row, the targets."""
    setup = report["setup"]
    intro = (f"Issue-19 audit benchmark (`benchmarks/audit.py`): MNIST, small CNN, the first {setup['train_limit']} "
             f"training images, commit {str(report['git']['commit'])[:10]}; mean ± std over seeds (n); rates and "
             "accuracies in %, clean Δ in points against the clean model of the same seed. Verdicts: P poisoned, "
             "I inconclusive, C clean.")
    audit_rows, compare_rows = [], []
    for cell in report["cells"]:
        agg, spec = cell["aggregate"], cell["spec"]
        audit = agg["rows"]["audit"]
        options = cell["attack_id"][len(spec["attack"]) + 1:] or "default"
        head = [spec["attack"], f"{options}, {targeting_label(spec)}", f"{100 * spec['rate']:g}%", str(agg["n"])]
        audit_rows.append([*head, fmt_stats(agg["asr_before"]), fmt_counts(agg["verdicts"]), fmt_stats(audit["recall"]),
                           fmt_stats(audit["fpr"], digits=3), fmt_stats(audit["asr_after"]),
                           fmt_stats(audit["clean_delta"], sign=True), targets_met(agg["targets"])])
        compare_rows.append([*head, *(fmt_stats(agg["rows"][r]["asr_after"]) if r in agg["rows"] else "-"
                                      for r in ROWS)])
    summary = [[name, f"{s['met']}/{s['evaluated']}", f"{s['cells_met']}/{s['cells_evaluated']}", str(s["vacuous"]),
                str(s["via_inconclusive"]), "; ".join(s["failing"][:5]) + (" ..." if len(s["failing"]) > 5 else "")]
               for name, s in report["targets"]["all"].items()]
    clean = ", ".join(f"seed {c['seed']}: {c['overall_verdict']}, sensitivity {fmt_sensitivity(c.get('sensitivity'))}"
                      for c in report["clean_audits"]) or "not run"
    return "\n\n".join([
        intro,
        md_table(["attack", "configuration", "rate", "n", "ASR before", "verdicts", "recall", "FPR", "ASR after",
                  "clean Δ", "targets met"], audit_rows),
        "ASR after retraining on each row's filtered set (%):",
        md_table(["attack", "configuration", "rate", "n", *ROWS], compare_rows),
        "Targets (each (cell, seed) or clean seed is one evaluation; a cell is met when every seed meets it; "
        "vacuous: met only because the suspect never learned the attack):",
        md_table(["target", "met / evaluated", "cells met", "vacuous", "via inconclusive", "failing"], summary),
        f"Clean data (eps-free audit of the unpoisoned set, one model per seed): {clean}.",
        "Sensitivity (robustdata/audit/sensitivity.py, stated on each cell seed's clean set): the smallest share of "
        "a class at which every canary (a 3x3 checkerboard planted dirty-label in a copy, the recipe retrained) and "
        "every canary at a larger share was detected; (n/n, >= the one-sided 95% lower bound on the detection "
        "probability). The `sensitivity` target checks that every target class at or above it is poisoned.",
    ]) + "\n"


# ------------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=("core", "full"), default=None,
                        help="Named grid (default: core, unless --spec is given).")
    parser.add_argument("--spec", action="append", default=[], help="A JSON spec (repeatable).")
    parser.add_argument("--attacks", nargs="+", default=None,
                        help=f"Keep only these attacks ({', '.join(attack_names())}).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Poison and model seeds.")
    parser.add_argument("--clean-seeds", type=int, default=5, help="Clean-data audits: model seeds 0..N-1.")
    parser.add_argument("--sensitivity-rounds", type=int, default=4,
                        help="Canary rounds stating the audit's sensitivity on each seed's clean set (each retrains "
                             "the suspect recipe once with 8 canaries); every cell of that seed is checked against "
                             "it. 0: no statement.")
    parser.add_argument("--train-limit", type=int, default=20000,
                        help="The first N training images are every cell's training set (~9 trainings a cell).")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                        help="Rows to run (the audit always runs: the targets read it).")
    parser.add_argument("--skip-art", action="store_true", help="Leave IBM ART's rows out (an optional extra).")
    parser.add_argument("--report-only", action="store_true", help="Tables and report from --work; train nothing.")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--work", type=Path, default=REPO / "bench-work/audit")
    parser.add_argument("--out", type=Path, default=REPO / "reports/bench/audit.json",
                        help="The report; its markdown tables go beside it (.md).")
    return parser.parse_args()


def make_context(args: argparse.Namespace) -> Context:
    params = load_params(args.params)
    splits = load_splits(params, args.train_limit)
    rows = [r for r in ROWS if r in {"audit", *args.rows} and not (args.skip_art and r in ART_ROWS)]
    setup = sha256_json({"data": sha256_tensors(splits.train.images, splits.train.labels),
                         "recipe": recipe_json(recipe_for(params, 0))})
    fingerprint = {"audit_code_sha256": audit_code_sha256(), "audit_params": params.audit.model_dump(mode="json")}
    # one folder per training set and recipe: another --train-limit or train_suspect never reuses a model
    return Context(splits, params, rows, args.work / f"n{len(splits.train)}-{setup[:10]}", fingerprint,
                   args.sensitivity_rounds)


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    ctx = make_context(args)
    selected = selected_specs(args)
    log.log(f"{len(selected)} cells x {len(args.seeds)} seeds, rows {ctx.rows}, work {ctx.work}")
    clean_seeds = sorted(set(range(args.clean_seeds)) | set(args.seeds))
    runs = [clean_run(seed, ctx, train_missing=not args.report_only, state=seed in args.seeds) for seed in clean_seeds]
    clean_by_seed = {run["seed"]: run for run in runs if run is not None}
    ctx.stated.update({seed: (run.get("sensitivity") or {}).get("fraction") for seed, run in clean_by_seed.items()})
    clean = [clean_by_seed[s] for s in range(args.clean_seeds) if s in clean_by_seed]
    if not args.report_only:
        for spec in selected:
            for seed in args.seeds:
                run_cell(spec, seed, ctx, clean_by_seed[seed]["clean_accuracy"])
                write_report(args, ctx, selected, clean, started)  # as much of the grid as has run
    report = write_report(args, ctx, selected, clean, started)
    print_tables(report)
    log.log(f"wrote {args.out} and {args.out.with_suffix('.md')} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

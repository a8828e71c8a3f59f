"""benchmarks/audit.py (the issue-19 audit benchmark): its target checks, spec ids, retrain cache keys, and
the ART activation-clustering runner it compares against. No training: hand-built cell results."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # benchmarks/ is no package; audit.py imports backdoors and provenance
_spec = importlib.util.spec_from_file_location("bench_audit", BENCHMARKS / "audit.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_audit"] = bench  # its dataclasses look their module up while it loads
_spec.loader.exec_module(bench)

from art_reference import art_activation_clustering  # noqa: E402
from test_art_reference import planted_problem, tiny_model  # noqa: E402


def cell(attack: str = "badnets", rate: float = 0.01, **changes) -> dict:
    """A (cell, seed) result that meets every target; `changes` set dotted paths, e.g. audit__time_ratio=3."""
    result = {
        "spec": bench.make_spec(attack, rate), "cell_id": "x", "seed": 0, "attack_id": attack,
        "category": bench.category(attack),
        "suspect": {"asr": 0.99, "clean_accuracy": 0.990},
        "clean_reference": {"seed": 0, "clean_accuracy": 0.991},
        "rows": {"audit": {"asr_after": 0.005, "clean_after": 0.990, "fpr": 0.002}},
        "audit": {"target_verdicts": {"0": "poisoned"}, "sensitivity": 0.02, "time_ratio": 1.3},
        "planted": {"target_fractions": {"0": 0.1}},
    }
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = result
        for key in parents:
            node = node[key]
        node[leaf] = value
    return result


def test_a_cell_that_meets_every_target():
    targets = bench.evaluate_targets(cell())
    assert set(targets) == {"learned", "asr_after", "clean_accuracy", "fpr", "never_clean", "sensitivity", "time"}
    assert all(t["met"] for t in targets.values()), targets
    assert targets["asr_after"]["via"] == "asr" and not targets["asr_after"]["vacuous"]
    assert targets["clean_accuracy"]["value"] == pytest.approx(-0.001)
    assert targets["clean_accuracy"]["margin"] == pytest.approx(0.002)  # 0.3 pt limit, 0.1 pt used
    assert targets["sensitivity"]["margin"] == pytest.approx(0.08)      # fraction 0.1 over stated 0.02


@pytest.mark.parametrize("target, changes", [
    ("learned", {"suspect__asr": 0.85}),
    ("asr_after", {"rows__audit__asr_after": 0.03}),
    ("clean_accuracy", {"rows__audit__clean_after": 0.987}),
    ("clean_accuracy", {"rows__audit__clean_after": 0.995}),   # "within": either side
    ("fpr", {"rows__audit__fpr": 0.011}),
    ("never_clean", {"rows__audit__asr_after": 0.5, "audit__target_verdicts": {"0": "clean"}}),
    ("sensitivity", {"audit__target_verdicts": {"0": "inconclusive"}}),
    ("time", {"audit__time_ratio": 2.1}),
])
def test_each_target_can_fail(target, changes):
    targets = bench.evaluate_targets(cell(**changes))
    assert targets[target]["met"] is False
    if target != "sensitivity":  # its margin is how far above the stated sensitivity the class was
        assert targets[target]["margin"] < 0
    others = {name: t["met"] for name, t in targets.items() if name != target and t["met"] is not None}
    assert all(others.values()) or target == "never_clean", others  # each check fails on its own


def test_dirty_label_at_half_a_percent_allows_no_inconclusive_escape():
    targets = bench.evaluate_targets(cell(rate=0.005, rows__audit__asr_after=0.05,
                                          audit__target_verdicts={"0": "inconclusive"}))
    assert targets["asr_after"]["met"] is False and targets["asr_after"]["limit"] == bench.DIRTY_ASR_AFTER


def test_low_rate_meets_through_inconclusive_and_says_so():
    inconclusive = bench.evaluate_targets(cell(rate=0.001, rows__audit__asr_after=0.4,
                                               audit__target_verdicts={"0": "inconclusive"}))
    assert inconclusive["asr_after"] | {"met": True, "via": "inconclusive"} == inconclusive["asr_after"]
    assert inconclusive["asr_after"]["limit"] == bench.LOOSE_ASR_AFTER
    assert "fpr" not in inconclusive and "clean_accuracy" not in inconclusive  # the 0.5-10% targets only
    clean = bench.evaluate_targets(cell(rate=0.001, rows__audit__asr_after=0.4, audit__target_verdicts={"0": "clean"}))
    assert clean["asr_after"]["met"] is False and clean["never_clean"]["met"] is False


@pytest.mark.parametrize("attack", ["sig", "label_consistent", "adap_blend", "adap_patch"])
def test_clean_label_and_adaptive_take_the_loose_target(attack):
    met = bench.evaluate_targets(cell(attack, 0.3, rows__audit__asr_after=0.08, rows__audit__fpr=0.2))
    assert met["asr_after"]["met"] and met["asr_after"]["limit"] == bench.LOOSE_ASR_AFTER
    assert "fpr" not in met
    missed = bench.evaluate_targets(cell(attack, 0.3, rows__audit__asr_after=0.12))
    assert missed["asr_after"]["met"] is False


def test_a_target_met_only_because_the_attack_was_never_learned_is_marked_vacuous():
    targets = bench.evaluate_targets(cell(suspect__asr=0.01, rows__audit__asr_after=0.01,
                                          audit__target_verdicts={"0": "clean"}))
    assert targets["learned"]["met"] is False
    assert targets["asr_after"]["met"] and targets["asr_after"]["vacuous"]


def test_sensitivity_is_not_evaluated_without_a_statement_or_below_it():
    assert bench.evaluate_targets(cell(audit__sensitivity=None))["sensitivity"]["met"] is None
    below = bench.evaluate_targets(cell(audit__sensitivity=0.2, audit__target_verdicts={"0": "clean"}))
    assert below["sensitivity"]["met"] is None
    # an attack the suspect did not learn is no backdoor to detect (the canaries count learned ones only)
    unlearned = bench.evaluate_targets(cell(suspect__asr=0.05, audit__target_verdicts={"0": "clean"}))
    assert unlearned["sensitivity"]["met"] is None and "not learned" in unlearned["sensitivity"]["note"]
    learned = bench.evaluate_targets(cell(suspect__asr=0.2, audit__target_verdicts={"0": "clean"}))
    assert learned["sensitivity"]["met"] is False


def test_clean_data_targets():
    entry = {"seed": 0, "overall_verdict": "clean", "class_verdicts": ["clean"] * 10, "time_ratio": 1.2}
    assert all(t["met"] for t in bench.clean_targets(entry).values())
    entry.update(overall_verdict="inconclusive", class_verdicts=["clean"] * 9 + ["inconclusive"])
    failed = bench.clean_targets(entry)["clean_verdict"]
    assert failed["met"] is False and failed["classes_not_clean"] == [9]


def test_summary_counts_evaluations_cells_and_lists_failures():
    good, bad = cell(), cell(rows__audit__fpr=0.05)
    good["targets"], bad["targets"] = bench.evaluate_targets(good), bench.evaluate_targets(bad)
    other = copy.deepcopy(good)
    other["cell_id"] = "y"
    summary = bench.targets_summary([good, bad, other])
    assert summary["fpr"] | {"evaluated": 3, "met": 2, "cells_evaluated": 2, "cells_met": 1} == summary["fpr"]
    assert len(summary["fpr"]["failing"]) == 1 and "seed 0 (x)" in summary["fpr"]["failing"][0]
    assert summary["sensitivity"]["min_margin"] == pytest.approx(0.08)


def test_one_seed_shows_no_plus_minus_zero():
    assert bench.fmt_stats(bench.stats([0.5])) == "50.00"
    assert bench.fmt_stats(bench.stats([0.5, 0.7])) == "60.00 ± 14.14"
    assert bench.fmt_stats(bench.stats([None])) == "-"


def test_spec_ids_are_stable_and_grids_cover_every_attack_and_configuration():
    spec = bench.make_spec("badnets", 0.01)
    assert bench.spec_id(spec) == "badnets-1206dfbb8a"  # pinned: a change orphans every cached cell
    assert bench.spec_id(dict(reversed(list(spec.items())))) == bench.spec_id(spec)
    core, full = bench.core_specs(), bench.full_specs()
    assert len({bench.spec_id(s) for s in core}) == len(core) and len({bench.spec_id(s) for s in full}) == len(full)
    assert {s["attack"] for s in core} == set(bench.attack_names())
    assert {s["targeting"] for s in core} == set(bench.TARGETINGS)
    assert {s["rate"] for s in full if bench.category(s["attack"]) == "dirty"} == set(bench.FULL_RATES["dirty"])


def test_retrain_key_follows_the_mask_and_what_the_model_is_trained_on():
    mask = torch.zeros(100, dtype=torch.bool)
    mask[[3, 50]] = True
    args = dict(seed=0, recipe={"epochs": 3}, train_limit=100, data_sha="d", triggered_sha="t")
    key = bench.retrain_key(mask, **args)
    assert bench.retrain_key(mask.clone(), **args) == key
    other = mask.clone()
    other[4] = True
    assert bench.retrain_key(other, **args) != key
    for change in ({"seed": 1}, {"recipe": {"epochs": 4}}, {"train_limit": 200}, {"data_sha": "e"},
                   {"triggered_sha": "u"}):
        assert bench.retrain_key(mask, **{**args, **change}) != key, change


def test_json_safe_leaves_tensors_out():
    entry = {"label": 0, "direction": torch.ones(3), "z": torch.tensor(1.5), "statistic": float("nan"),
             "reasons": ("a",)}
    assert bench.json_safe(entry) == {"label": 0, "z": 1.5, "statistic": None, "reasons": ["a"]}


def test_art_activation_clustering_flags_the_planted_cluster_repeatably():
    """Untrained, the tiny model's ReLU layer still separates class 0's poisons (another digit's band and a
    patch) from its clean images, so ART's smaller cluster of class 0 is the poisons."""
    images, labels, poison = planted_problem()
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    np.random.seed(7)
    numpy_state = np.random.get_state()[1].copy()

    result = bench_art(model, images, labels)

    flagged = result["flagged"]
    assert flagged.dtype == np.bool_ and flagged.shape == (len(labels),)
    assert np.array_equal(np.flatnonzero(flagged[labels.numpy() == 0]), np.flatnonzero(poison.numpy()))
    per_class = np.bincount(labels.numpy()[flagged], minlength=10)
    assert (per_class > 0).all() and (2 * per_class <= 200).all()  # the smaller cluster of every class
    assert result["smaller_cluster_fraction"][0] == pytest.approx(0.1)
    assert np.array_equal(np.random.get_state()[1], numpy_state)  # numpy's global stream is restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert np.array_equal(bench_art(model, images, labels)["flagged"], flagged)  # seeded: repeatable


def bench_art(model, images, labels):
    return art_activation_clustering(model, images, labels, num_classes=10, layer_module_name="relu", seed=0)


def test_the_audit_fingerprint_ignores_comments_and_docstrings_but_not_code():
    module = '"""A module."""\nx = 1  # a note\n\n\ndef f():\n    """What f does."""\n    return x\n'
    reworded = '"""The module, reworded."""\nx = 1\n\n\ndef f():\n    """Said otherwise."""\n    return x\n'
    changed = '"""A module."""\nx = 2  # a note\n\n\ndef f():\n    """What f does."""\n    return x\n'
    assert bench.code_only(module) == bench.code_only(reworded) != bench.code_only(changed)
    only_a_docstring = 'def g():\n    """Nothing else."""\n'
    assert bench.code_only(only_a_docstring) != bench.code_only('def g():\n    return 1\n')


def test_an_audit_change_keeps_only_the_rows_that_do_not_read_the_audit():
    rows = {name: {"flagged": 1} for name in bench.ROWS}
    previous = {"suspect": {"key": "k"}, "fingerprint": {"audit_params": {"layer": "penultimate"}}, "rows": rows}
    assert set(bench.audit_free_rows(previous, "k", "penultimate")) == {"art_spectral", "art_clustering", "perfect"}
    assert bench.audit_free_rows(previous, "another suspect", "penultimate") == {}
    assert bench.audit_free_rows(previous, "k", "last_conv") == {}
    assert bench.audit_free_rows(None, "k", "penultimate") == {}

"""The audit loop end to end through the real CLI and Prefect flows, on a small MNIST subset:
plant poisons -> train the suspect model -> audit -> retrain -> before/after, and the CI gate."""

import json
import os
import shutil
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml

from robustdata.data.manifest import read_manifest
from conftest import markdown_rows, tree_digest


@pytest.fixture(autouse=True)
def server_url(prefect_server):
    global API_URL
    API_URL = prefect_server


def invoke(*args, cwd=None):
    env = {**os.environ, "PREFECT_API_URL": API_URL, "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "robustdata", *map(str, args)], capture_output=True,
                            text=True, env=env, timeout=600, cwd=cwd)
    return result


def verdict_events(dataset, timeout=60.0):
    """The `robustdata.audit.*` events the server recorded about `dataset` (polled: events are persisted in
    batches)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    resource = f"robustdata.dataset.{dataset.resolve()}"
    wanted = EventFilter(event=EventNameFilter(prefix=["robustdata.audit."]), resource=EventResourceFilter(id=[resource]))
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            events = client.read_events(filter=wanted, limit=50).events  # the server's page size
            if events or time.monotonic() > deadline:
                return events
            time.sleep(1)


TRAIN = {"arch": "small_cnn", "epochs": 3, "batch_size": 64, "lr": 0.05, "precision": "bf16", "seed": 0}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, prefect_server, cache_dir):
    """A params file wired into a temp directory, with a 6,000-image MNIST ingest."""
    global API_URL
    API_URL = prefect_server
    root = tmp_path_factory.mktemp("loop")
    params = {
        "ingest": {"source": "mnist", "out": str(root / "mnist"), "limit": 6000},
        "poison": {"data": str(root / "mnist"), "out": str(root / "poisoned"), "count": 60, "rate": None,
                   "target": 0, "seed": 0},
        "train_suspect": {**TRAIN, "data": str(root / "poisoned"), "out": str(root / "suspect")},
        "audit": {"model": str(root / "suspect"), "data": str(root / "poisoned"), "out": str(root / "filtered"),
                  "report": str(root / "report")},
        "retrain_clean": {**TRAIN, "data": str(root / "filtered"), "out": str(root / "filtered_model")},
        "audit_eval": {"models": [str(root / "suspect"), str(root / "filtered_model")],
                       "clean_test": str(root / "mnist" / "test"),
                       "triggered_test": str(root / "poisoned" / "test_triggered"),
                       "audit_report": str(root / "report"), "audited_data": str(root / "poisoned" / "train"),
                       "out": str(root / "loop")},
        "evaluate": {"out": str(root / "evaluate")},
        "results": {"out": str(root / "site")},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    result = invoke("ingest", "--params", path)
    assert result.returncode == 0, result.stderr
    return root, path


def test_audit_loop_finds_planted_poisons_and_removes_the_backdoor(workspace):
    root, params = workspace
    result = invoke("audit-loop", "--params", params, "--plant")
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(root / "poisoned" / "train" / "manifest.parquet")
    planted = manifest.filter(manifest.column("is_poison")).column("key").to_pylist()
    assert len(planted) == 60 and set(manifest.filter(manifest.column("is_poison")).column("label").to_pylist()) == {0}

    summary = json.loads((root / "report" / "summary.json").read_text())
    assert summary["poisoned_classes"] == [0] and summary["mode"] == "auto" and summary["layer"] == "penultimate"
    assert summary["verdict"] == "poisoned" and summary["classes"][0]["verdict"] == "poisoned"
    gate_metrics = json.loads((root / "report" / "metrics.json").read_text())
    assert gate_metrics["verdict"] == "poisoned" and gate_metrics["verdict_code"] == 2
    events = verdict_events(root / "poisoned")
    assert {event.event for event in events} == {"robustdata.audit.poisoned"}
    assert events[0].payload["poisoned_classes"] == [0] and events[0].payload["report"] == str(root / "report")
    scores = pq.read_table(root / "report" / "scores.parquet")
    removed = set(scores.filter(scores.column("filter_flagged")).column("key").to_pylist())
    assert len(removed & set(planted)) >= 57  # >= 95% of the planted poisons
    assert len(removed - set(planted)) <= 0.02 * (6000 - 60)

    kept = read_manifest(root / "filtered" / "train" / "manifest.parquet")
    assert kept.num_rows == 6000 - len(removed)
    assert set(kept.column("origin_key").to_pylist()).isdisjoint(removed)  # lineage to the original keys

    metrics = json.loads((root / "loop" / "metrics.json").read_text())
    assert metrics["suspect"]["asr"] > 0.5, "the planted backdoor should work on the suspect model"
    assert metrics["filtered_model"]["asr"] < 0.05
    assert metrics["filtered_model"]["clean_accuracy"] > 0.9
    for name in ("report.md", "report.html", "figures/score_histograms.png", "figures/suspicious_0.png"):
        assert (root / "loop" / name).exists(), name
    assert "before" in (root / "loop" / "report.md").read_text().lower()

    gate = invoke("audit", "--params", params, "--fail-on-detect")
    assert gate.returncode == 4 and "poisons detected" in gate.stderr

    # the results page holds the numbers of the JSON metrics, and the audit's DVC plots data
    page = invoke("results", "--params", params)
    assert page.returncode == 0, page.stderr
    rows = markdown_rows((root / "site" / "index.md").read_text())
    html = (root / "site" / "index.html").read_text()
    for model, values in metrics.items():
        expected = [f"{100 * values['clean_accuracy']:.2f}%", f"{100 * values['asr']:.2f}%"]
        assert rows[model] == expected and all(v in html for v in expected)
    audit_metrics = json.loads((root / "report" / "metrics.json").read_text())
    assert f"flagged {audit_metrics['num_flagged']} samples" in html
    separation = json.loads((root / "report" / "plots" / "separation.json").read_text())
    assert [c["separation"] for c in separation] == [c["statistic"] for c in summary["classes"]]


def test_clean_set_passes_the_gate(workspace):
    root, params = workspace
    clean = root / "clean_model"
    trained = invoke("train", "--kind", "suspect", "--params", params, "--data", root / "mnist", "--out", clean)
    assert trained.returncode == 0, trained.stderr
    result = invoke("audit", "--params", params, "--model", clean, "--data", root / "mnist",
                    "--out", root / "clean_filtered", "--report", root / "clean_report", "--fail-on-detect")
    assert result.returncode == 0, result.stderr
    summary = json.loads((root / "clean_report" / "summary.json").read_text())
    assert summary["poisoned_classes"] == [] and summary["num_flagged"] == 0 and summary["verdict"] == "clean"
    assert {c["verdict"] for c in summary["classes"]} == {"clean"}
    assert [event.event for event in verdict_events(root / "mnist")] == ["robustdata.audit.clean"]
    assert summary["ground_truth"] is False  # an ingest has no is_poison ground truth


def test_the_audit_states_its_sensitivity_from_canaries_a_retrained_model_learned(workspace):
    """One canary round on the clean set: 8 checkerboard canaries at 0.5-10% of their classes, the suspect's
    recipe retrained on the copy, the copy audited. The statement is what was detected, and the largest canary
    (10%: the only one this small set's recipe learns, attack success 77%; the smaller ones stay below 10%) is
    found."""
    root, params = workspace
    result = invoke("audit", "--params", params, "--model", root / "clean_model", "--data", root / "mnist",
                    "--out", root / "sensitivity_filtered", "--report", root / "sensitivity_report",
                    "--sensitivity-rounds", "1")
    assert result.returncode == 0, result.stderr
    summary = json.loads((root / "sensitivity_report" / "summary.json").read_text())
    stated = summary["sensitivity"]
    canaries = [c for entry in stated["per_fraction"] for c in entry["canaries"]]
    assert len(canaries) == 8 and len({c["label"] for c in canaries}) == 8 and stated["rounds"] == 1
    largest = [c for c in canaries if c["fraction"] == 0.1]
    assert largest and all(c["attack_success"] > 0.5 and c["detected"] for c in largest)
    assert stated["fraction"] is not None and stated["fraction"] <= 0.1
    assert all(c["detected"] for c in canaries if c["fraction"] >= stated["fraction"] and c["attack_success"] > 0.1)
    metrics = json.loads((root / "sensitivity_report" / "metrics.json").read_text())
    assert metrics["sensitivity_fraction"] == stated["fraction"]
    assert "Sensitivity: 3x3 checkerboard" in (root / "sensitivity_report" / "report.md").read_text()
    assert summary["verdict"] == "clean"  # the canaries were planted in a copy: the audited set is untouched


@pytest.mark.parametrize("verdict, flagged, allow, code", [
    ("clean", 0, False, None), ("poisoned", 12, False, 4), ("clean", 3, False, 4),  # eps mode flags in clean classes
    ("inconclusive", 0, False, 5), ("inconclusive", 0, True, None), ("poisoned", 12, True, 4)])
def test_the_gate_exits_with_the_verdicts_code(verdict, flagged, allow, code):
    import typer

    from robustdata.cli import gate

    if code is None:
        gate(verdict, flagged, allow)
        return
    with pytest.raises(typer.Exit) as exit_info:
        gate(verdict, flagged, allow)
    assert exit_info.value.exit_code == code


def test_bad_audit_input_is_one_line_error(workspace, tmp_path):
    root, params = workspace
    result = invoke("audit", "--params", params, "--model", tmp_path / "nowhere")
    assert result.returncode == 2 and "error:" in result.stderr and "nowhere" in result.stderr
    assert "Traceback" not in result.stderr
    result = invoke("audit", "--params", params, "--eps", "1.5")
    assert result.returncode == 2 and "eps" in result.stderr


def test_tampered_model_or_audited_data_is_refused(workspace, tmp_path):
    """Weights altered after training, or the audited set rebuilt after the audit: exit code 3, nothing written."""
    root, params = workspace
    if not (root / "suspect" / "model.pt").exists():
        assert invoke("audit-loop", "--params", params, "--plant").returncode == 0
    tampered = tmp_path / "tampered"
    shutil.copytree(root / "suspect", tampered)
    weights = bytearray((tampered / "model.pt").read_bytes())
    weights[len(weights) // 2] ^= 0x01
    (tampered / "model.pt").write_bytes(bytes(weights))
    result = invoke("audit", "--params", params, "--model", tampered, "--report", tmp_path / "report",
                    "--out", tmp_path / "filtered")
    assert result.returncode == 3 and "altered" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "report").exists() and not (tmp_path / "filtered").exists()


def test_audit_on_a_dask_cluster_is_byte_identical_to_one_process(workspace, tmp_path):
    """The representation extracted in chunks on a 2-worker Dask LocalCluster gives the same scores,
    report numbers and filtered set as the single pass in this process."""
    root, params = workspace
    if not (root / "suspect" / "model.pt").exists():
        assert invoke("audit-loop", "--params", params, "--plant").returncode == 0
    runs = {}
    for name, options in {"single": [], "dask": ["--dask", "local", "--workers", "2"]}.items():
        result = invoke("audit", "--params", params, "--report", tmp_path / name / "report",
                        "--out", tmp_path / name / "filtered", *options)
        assert result.returncode == 0, result.stderr
        summary = json.loads((tmp_path / name / "report" / "summary.json").read_text())
        runs[name] = (tree_digest(tmp_path / name / "filtered"),
                      (tmp_path / name / "report" / "scores.parquet").read_bytes(), summary)
    (single_tree, single_scores, single), (dask_tree, dask_scores, on_dask) = runs["single"], runs["dask"]
    assert on_dask["params"]["dask"] == "local" and single["params"]["dask"] is None
    assert single["num_flagged"] > 0 and on_dask["classes"] == single["classes"]
    assert dask_scores == single_scores and dask_tree == single_tree

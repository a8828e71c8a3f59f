"""Fault tolerance: a stage killed at any point and run again ends with the results of an
uninterrupted run, and never leaves a half-written artifact that looks complete.

Training resumes from the state it saves after every epoch (<out>.partial/resume.pt);
the audit writes each output directory atomically, so a kill leaves it absent or whole.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import tree_digest

import robustdata.train.training as training
from robustdata.config import AdversarialParams, PoisonParams, TrainParams
from robustdata.data.ingest import ingest_split
from robustdata.data.memory import load_in_memory
from robustdata.data.sources import MnistMirror
from robustdata.io import read_json, write_bytes_atomic
from robustdata.train.training import RESUME_FILE, fit, load_resume_state, work_dir


@pytest.fixture(scope="module")
def mnist(tmp_path_factory, cache_dir) -> Path:
    """A small MNIST ingest: train/ (3,000), val/ and test/ (500 each)."""
    root = tmp_path_factory.mktemp("mnist")
    source = MnistMirror(cache_dir=cache_dir)
    for split, n in [("train", 3000), ("val", 500), ("test", 500)]:
        ingest_split(source, split, root / split, shard_size=1000, limit=n, progress=False)
    return root


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def without_seconds(description: dict) -> dict:
    return {k: v for k, v in description.items() if k != "train_seconds"}


class Killed(Exception):
    """Stands in for a SIGKILL right after a resume state was saved."""


def count_saves(monkeypatch, crash_after: int | None = None) -> list[int]:
    """Count resume-state saves (each one's next_epoch); raise Killed after the `crash_after`-th."""
    saved, real = [], training.save_resume_state

    def save(path, stateful, meta):
        real(path, stateful, meta)
        saved.append(meta["next_epoch"])
        if len(saved) == crash_after:
            raise Killed

    monkeypatch.setattr(training, "save_resume_state", save)
    return saved


STANDARD = TrainParams(epochs=3, batch_size=64, lr=0.05, limit=600, device="cpu")
ADVERSARIAL = TrainParams(epochs=3, batch_size=64, lr=0.05, limit=300, device="cpu", label_smoothing=0.0,
                          adversarial=AdversarialParams(method="pgd", steps=2, step_size=0.15, guard_size=50))
INPUTS = {"train_manifest_sha256": "a" * 64}


@pytest.mark.parametrize("params", [STANDARD, ADVERSARIAL], ids=["standard", "adversarial-pgd"])
def test_training_resumed_after_a_crash_is_bit_identical(mnist, params, tmp_path, monkeypatch):
    train, val = load_in_memory(mnist / "train", progress=False), load_in_memory(mnist / "val", progress=False)
    reference, expected = fit(train, val, params, progress=False)  # uninterrupted, nothing saved

    work = tmp_path / "model.partial"
    with monkeypatch.context() as patch:
        count_saves(patch, crash_after=1)
        with pytest.raises(Killed):
            fit(train, val, params, progress=False, resume_dir=work, inputs=INPUTS)
    assert read_json(work / "resume.json")["next_epoch"] == 1

    with monkeypatch.context() as patch:
        saves = count_saves(patch)
        resumed, description = fit(train, val, params, progress=False, resume_dir=work, inputs=INPUTS)
    assert saves == [2, 3], "the rerun should train epochs 2 and 3 only"
    assert_same_weights(reference, resumed)
    assert without_seconds(description) == without_seconds(expected)
    if params.adversarial is not None:  # the guard's PGD accuracies were carried across the crash
        assert [h["val_pgd10_accuracy"] for h in description["history"]] == \
               [h["val_pgd10_accuracy"] for h in expected["history"]]


def test_a_resume_state_from_other_params_or_data_or_half_written_is_ignored(mnist, tmp_path, monkeypatch):
    train, val = load_in_memory(mnist / "train", progress=False), load_in_memory(mnist / "val", progress=False)
    params = STANDARD.model_copy(update={"epochs": 2, "limit": 300})
    work = tmp_path / "model.partial"
    with monkeypatch.context() as patch:
        count_saves(patch, crash_after=1)
        with pytest.raises(Killed):
            fit(train, val, params, progress=False, resume_dir=work, inputs=INPUTS)
    state = work / RESUME_FILE
    fingerprint = read_json(work / "resume.json")["fingerprint"]
    assert load_resume_state(state, {}, fingerprint) is not None
    assert load_resume_state(state, {}, {**fingerprint, "inputs": {"train_manifest_sha256": "b" * 64}}) is None
    assert load_resume_state(state, {}, {**fingerprint, "params": {**fingerprint["params"], "lr": 0.1}}) is None

    # other params in the same work dir: trained from scratch, as if nothing were there
    other = params.model_copy(update={"lr": 0.1})
    fresh, _ = fit(train, val, other, progress=False)
    with monkeypatch.context() as patch:
        saves = count_saves(patch)
        model, _ = fit(train, val, other, progress=False, resume_dir=work, inputs=INPUTS)
    assert saves == [1, 2]
    assert_same_weights(fresh, model)

    # a torch file whose sidecar does not record its hash (killed between the two writes) is absent
    write_bytes_atomic(state, state.read_bytes() + b"\0")
    assert load_resume_state(state, {}, read_json(work / "resume.json")["fingerprint"]) is None
    (work / "resume.json").unlink()
    assert load_resume_state(state, {}, fingerprint) is None


# ------------------------------------------------------------------------------------ real SIGKILLs


def robustdata_cli(*args) -> list[str]:
    return [sys.executable, "-m", "robustdata", *map(str, args)]


def cli_env(api_url: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": api_url, "COLUMNS": "200"}


def run_cli(api_url: str, *args) -> subprocess.CompletedProcess:
    result = subprocess.run(robustdata_cli(*args), capture_output=True, text=True, env=cli_env(api_url),
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return result


def kill_when(api_url: str, args: list, ready, log: Path) -> bool:
    """Run the CLI and SIGKILL its process group as soon as ready() holds.
    Return whether it was killed (False: it finished first, successfully)."""
    with open(log, "w") as out:
        process = subprocess.Popen(robustdata_cli(*args), stdout=out, stderr=subprocess.STDOUT,
                                   env=cli_env(api_url), start_new_session=True)
        try:
            while process.poll() is None and not ready():
                time.sleep(0.02)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if process.returncode == -signal.SIGKILL:
        return True
    assert process.returncode == 0, log.read_text()
    return False


def visible(directory: Path) -> set[str]:
    """Entries a later stage could pick up (temporary siblings start with a dot)."""
    return {p.name for p in directory.iterdir() if not p.name.startswith(".")}


def test_train_killed_mid_run_resumes_to_the_same_model(mnist, prefect_server, tmp_path):
    out = tmp_path / "models" / "standard"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train_standard": {
        "data": str(mnist), "out": str(out), "arch": "small_cnn", "epochs": 3, "batch_size": 64, "lr": 0.05,
        "limit": 1000, "device": "cpu"}}))
    train = ["train", "--kind", "standard", "--params", params]

    run_cli(prefect_server, *train)  # uninterrupted: the reference
    reference = out.rename(tmp_path / "reference")

    sidecar = work_dir(out) / "resume.json"
    assert kill_when(prefect_server, train, sidecar.exists, tmp_path / "killed.log")
    assert not out.exists(), "a killed training run must not leave an output that looks complete"
    assert visible(out.parent) == {"standard.partial"}
    next_epoch = read_json(sidecar)["next_epoch"]
    assert 1 <= next_epoch < 3

    rerun = run_cli(prefect_server, *train)
    assert not work_dir(out).exists()
    assert "epoch 1/3" not in rerun.stderr and f"epoch {next_epoch + 1}/3" in rerun.stderr  # it resumed
    ours = torch.load(out / "model.pt", weights_only=True)
    theirs = torch.load(reference / "model.pt", weights_only=True)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert without_seconds(read_json(out / "model.json")) == without_seconds(read_json(reference / "model.json"))


def test_audit_killed_mid_run_leaves_no_half_written_output(mnist, prefect_server, tmp_path):
    from robustdata.flows.audit import poison_flow
    from robustdata.flows.train import train_flow

    poison_flow(PoisonParams(data=mnist, out=tmp_path / "poisoned", count=30, rate=None, target=0))
    train_flow(TrainParams(data=tmp_path / "poisoned", out=tmp_path / "suspect", epochs=2, batch_size=64,
                           lr=0.05, device="cpu"))
    outputs = tmp_path / "outputs"

    def audit(name: str) -> list:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"audit": {
            "model": str(tmp_path / "suspect"), "data": str(tmp_path / "poisoned"), "device": "cpu",
            "out": str(outputs / f"{name}_filtered"), "report": str(outputs / f"{name}_report")}}))
        return ["audit", "--params", path]

    run_cli(prefect_server, *audit("reference"))
    reference_report, reference_data = outputs / "reference_report", outputs / "reference_filtered"
    report, data = outputs / "killed_report", outputs / "killed_filtered"

    def check_whole_or_absent() -> None:
        assert visible(outputs) <= {"reference_report", "reference_filtered", "killed_report", "killed_filtered"}
        if report.exists():
            assert visible(report) == visible(reference_report)
            assert (report / "scores.parquet").read_bytes() == (reference_report / "scores.parquet").read_bytes()
        if data.exists():
            assert (data / "train" / "card.json").exists() and (data / "val" / "card.json").exists()
            assert tree_digest(data) == tree_digest(reference_data)

    def kill_while_writing(name: str, delay: float, log: Path) -> bool:
        """SIGKILL the audit `delay` s after it starts writing outputs/<name> (its staging directory appears)."""
        before, since = set(outputs.glob(f".{name}.*.tmp")), []

        def writing() -> bool:
            if not since and set(outputs.glob(f".{name}.*.tmp")) - before:
                since.append(time.monotonic())
            return bool(since) and time.monotonic() - since[0] >= delay

        return kill_when(prefect_server, audit("killed"), writing, log)

    # killed while it writes the report, then while it writes the filtered dataset (the report done)
    rng = random.Random(0)
    assert kill_while_writing("killed_report", rng.uniform(0, 0.3), tmp_path / "killed1.log")
    check_whole_or_absent()
    k2 = kill_while_writing("killed_filtered", rng.uniform(0, 0.2), tmp_path / "killed2.log")
    check_whole_or_absent()
    print("DIAG", k2, sorted(p.name for p in outputs.iterdir()))

    run_cli(prefect_server, *audit("killed"))
    assert (report / "scores.parquet").read_bytes() == (reference_report / "scores.parquet").read_bytes()
    assert tree_digest(data) == tree_digest(reference_data)
    assert pq.read_table(report / "scores.parquet").num_rows == 3000

"""`dvc repro` on a fresh copy of the repo, then push to and pull from a local remote."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tree_digest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def fresh_copy(dest: Path) -> Path:
    """The working tree as git would clone it (tracked + untracked-not-ignored files)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_symlink():  # robustdata/flows -> ../flows: a link, as git checks it out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(source), dest / name)
        elif source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "copy"], cwd=dest, check=True)
    return dest


def test_dvc_repro_status_push_pull(tmp_path, prefect_server):
    clone = fresh_copy(tmp_path / "clone")
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["ingest"].update(limit=300, shard_size=100)  # a small run of the real stage
    (clone / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_API_URL": prefect_server}
    dvc = [str(BIN / "dvc")]

    run(dvc + ["repro", "ingest"], clone, env)
    out = clone / params["ingest"]["out"]
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "test", "train", "val"]
    assert len(list((out / "train").glob("shard-*.tar"))) == 3
    assert "up to date" in run(dvc + ["status", "ingest"], clone, env)
    assert "didn't change, skipping" in run(dvc + ["repro", "ingest"], clone, env)

    run(dvc + ["remote", "add", "-d", "store", str(tmp_path / "remote")], clone, env)
    run(dvc + ["push"], clone, env)
    before = tree_digest(out)
    shutil.rmtree(out)
    shutil.rmtree(clone / ".dvc" / "cache")
    run(dvc + ["pull", "ingest"], clone, env)
    assert tree_digest(out) == before
    assert "up to date" in run(dvc + ["status", "ingest"], clone, env)


def lock_stage(text: str, stage: str) -> dict:
    """One stage's entry (cmd, deps, params, outs with their hashes) of a dvc.lock."""
    stages = (yaml.safe_load(text) or {}).get("stages") or {}
    assert stage in stages, f"dvc.lock has no {stage!r} stage: {sorted(stages)}"
    return stages[stage]


@pytest.mark.slow
def test_full_repro_on_fresh_copy_matches_committed_lock(tmp_path, prefect_server):
    """The committed dvc.lock is reproduced byte for byte: same MNIST, same shards, same hashes. The copy runs
    its own code (PYTHONPATH), not the checkout the virtualenv's editable install points at."""
    clone = fresh_copy(tmp_path / "clone")
    committed = lock_stage((clone / "dvc.lock").read_text(), "ingest")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_API_URL": prefect_server,
           "PYTHONPATH": str(clone)}
    run([str(BIN / "dvc"), "repro", "ingest"], clone, env)
    assert (clone / "data" / "mnist" / "train" / "card.json").exists()
    reproduced = lock_stage((clone / "dvc.lock").read_text(), "ingest")
    assert reproduced["outs"] == committed["outs"], \
        "the ingest stage built other bytes than dvc.lock records (outs hashes differ): " \
        f"committed {committed['outs']}, reproduced {reproduced['outs']}"
    assert reproduced == committed, \
        "the ingest stage's lock changed (deps or params); rerun `make repro` and commit dvc.lock"


def test_dvc_exp_run_sweeps_an_audit_param(tmp_path, prefect_server):
    """`dvc exp run -S audit.kappa=...` reruns only the audit, and the detection threshold it sweeps
    decides the outcome: a low kappa flags the planted poisons, a huge one flags nothing."""
    clone = fresh_copy(tmp_path / "clone")
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["ingest"].update(limit=3000, shard_size=1000)
    params["poison"].update(rate=None, count=30)
    params["train_suspect"].update(epochs=3)
    (clone / "params.yaml").write_text(yaml.safe_dump(params))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["commit", "-qam", "small"], cwd=clone, check=True)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_API_URL": prefect_server}
    dvc = [str(BIN / "dvc")]

    flagged = {}
    for kappa in (3, 1000):
        log = run(dvc + ["exp", "run", "audit", "-S", f"audit.kappa={kappa}"], clone, env)
        flagged[kappa] = json.loads((clone / "reports" / "audit" / "metrics.json").read_text())
        assert json.loads((clone / "reports" / "audit" / "summary.json").read_text())["params"]["kappa"] == kappa
        if kappa == 1000:
            assert "Running stage 'train_suspect'" not in log  # upstream stages come from the run cache
    assert flagged[3]["num_flagged"] >= 27 and flagged[1000]["num_flagged"] == 0

    shown = json.loads(run(dvc + ["exp", "show", "--json"], clone, env))
    kappas = sorted(experiment["data"]["params"]["params.yaml"]["data"]["audit"]["kappa"]
                    for commit in shown for experiment in commit.get("experiments") or []
                    for experiment in experiment["revs"])
    assert kappas == [3, 1000]

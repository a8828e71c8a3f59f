"""The pipeline's order lives in dvc.yaml only: `robustdata pipeline`, the audit loop, the scheduled audit and
the benchmark's plain run take their stages and order from it. Each test edits a copy of dvc.yaml (a stage
moved or added) and checks that the flows follow it, with every stage's call replaced by a recorder."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from robustdata.config import Params
from robustdata.errors import RobustDataError
from robustdata.flows import stages as stages_module
from robustdata.flows.audit import audit_loop_flow
from robustdata.flows.pipeline import pipeline_flow
from robustdata.flows.schedule import scheduled_audit_flow
from robustdata.flows.stages import STAGE_CALLS, StageCall, load_pipeline

REPO_ROOT = Path(__file__).resolve().parents[1]
# dvc repro's order of today's dvc.yaml: the baseline that each edit below changes
REPRO_ORDER = ["ingest", "train_standard", "train_plain", "train_robust", "evaluate", "poison", "train_suspect",
               "audit", "retrain_clean", "build_robust", "build_nonrobust", "build_rand", "build_det",
               "evaluate_original", "evaluate_robust", "evaluate_nonrobust", "evaluate_rand", "evaluate_det",
               "robustify_report", "results"]


def names(stages) -> list[str]:
    return [stage.name for stage in stages]


def edited_dvc_yaml(tmp_path: Path, edit) -> Path:
    """A copy of the repository's dvc.yaml (with params.yaml beside it, for its ${...}) after `edit`."""
    root = tmp_path / "repo"
    root.mkdir(parents=True)
    shutil.copy(REPO_ROOT / "params.yaml", root / "params.yaml")
    document = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    edit(document["stages"])
    (root / "dvc.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    return root / "dvc.yaml"


def train_standard_after_audit(stages: dict) -> None:
    """train_standard now reads the audit's metrics: it must run after poison -> train_suspect -> audit."""
    stages["train_standard"]["deps"].append("${audit.report}/metrics.json")


def suspect_check_before_audit(stages: dict) -> None:
    """A new stage between train_suspect and audit, and one between audit and retrain_clean."""
    stages["evaluate_suspect"] = {"cmd": "robustdata evaluate --params params.yaml",
                                  "deps": ["${train_suspect.out}"], "outs": ["reports/suspect-check"]}
    stages["audit"]["deps"].append("reports/suspect-check")
    stages["train_filtered_twice"] = {"cmd": "robustdata train --kind clean --params params.yaml",
                                      "deps": ["${audit.out}"], "outs": ["models/filtered-twice"]}
    stages["retrain_clean"]["deps"].append("models/filtered-twice")


@pytest.fixture()
def recorded(monkeypatch) -> list[tuple[str, str | None]]:
    """Every stage call as (command, kind), in the order made; nothing really runs."""
    calls: list[tuple[str, str | None]] = []

    def recorder(command: str):
        def run(params, kind):
            calls.append((command, kind))
            return {"command": command, "num_flagged": 0, "poisoned_classes": [], "metrics": {}, "report": "r",
                    "html": "index.html"}
        return run

    fakes = {command: StageCall(recorder(command), call.kinds, call.default_kind) for command, call in STAGE_CALLS.items()}
    monkeypatch.setattr(stages_module, "STAGE_CALLS", fakes)
    return calls


def calls_of(dvc_yaml: Path, order: list[str]) -> list[tuple[str, str | None]]:
    """The (command, kind) calls that running `order`'s stages of `dvc_yaml` makes."""
    stages = load_pipeline(dvc_yaml).stages
    return [(stages[name].command, stages[name].kind or STAGE_CALLS[stages[name].command].default_kind)
            for name in order]


def test_the_order_is_dvc_repro_order_of_the_repository_dvc_yaml():
    pipeline = load_pipeline()
    assert names(pipeline.order()) == REPRO_ORDER
    assert names(pipeline.order(["audit"])) == ["ingest", "poison", "train_suspect", "audit"]
    assert names(pipeline.between("poison", "retrain_clean")) == ["poison", "train_suspect", "audit", "retrain_clean"]
    stages_module.check_runnable(pipeline.order())  # every stage's command has a flow call


def test_a_moved_dependency_moves_the_stage(tmp_path):
    pipeline = load_pipeline(edited_dvc_yaml(tmp_path, train_standard_after_audit))
    order = names(pipeline.order())
    assert order != REPRO_ORDER
    assert order.index("audit") < order.index("train_standard") < order.index("evaluate")
    assert set(order) == set(REPRO_ORDER)


def test_pipeline_flow_runs_the_stages_in_the_order_dvc_yaml_gives(tmp_path, monkeypatch, recorded):
    dvc_yaml = edited_dvc_yaml(tmp_path, train_standard_after_audit)
    monkeypatch.setattr(stages_module, "DVC_YAML", dvc_yaml)
    result = pipeline_flow.fn(Params())
    expected = ["ingest", "poison", "train_suspect", "audit", "train_standard", "train_plain", "train_robust",
                "evaluate", "retrain_clean", *REPRO_ORDER[9:]]
    assert names(load_pipeline(dvc_yaml).order()) == expected
    assert recorded == calls_of(dvc_yaml, expected)
    assert result["command"] == "results"


def test_the_audit_loop_and_the_scheduled_audit_take_a_new_stage(tmp_path, monkeypatch, recorded):
    dvc_yaml = edited_dvc_yaml(tmp_path, suspect_check_before_audit)
    monkeypatch.setattr(stages_module, "DVC_YAML", dvc_yaml)

    loop = audit_loop_flow.fn(Params(), plant=True)
    expected = ["poison", "train_suspect", "evaluate_suspect", "audit", "train_filtered_twice", "retrain_clean"]
    assert recorded == calls_of(dvc_yaml, expected)
    assert loop["planted"]["command"] == "poison" and loop["loop"]["command"] == "retrain-clean"

    recorded.clear()
    audit_loop_flow.fn(Params(), plant=False)
    assert recorded == calls_of(dvc_yaml, expected[1:])

    recorded.clear()
    params = tmp_path / "repo" / "params.yaml"
    monkeypatch.chdir(tmp_path)  # the flow moves to the params file's directory; monkeypatch moves back
    scheduled = scheduled_audit_flow.fn(str(params), plant=True)
    expected = ["ingest", "poison", "train_suspect", "evaluate_suspect", "audit", "results"]
    assert recorded == calls_of(dvc_yaml, expected)
    assert scheduled["planted"]["command"] == "poison" and scheduled["results_page"] == "index.html"

    recorded.clear()
    scheduled_audit_flow.fn(str(params), plant=False)
    assert recorded == calls_of(dvc_yaml, [name for name in expected if name != "poison"])


def test_the_benchmark_plain_run_follows_dvc_yaml(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO_ROOT))
    try:
        import benchmarks.pipeline as bench
    finally:
        sys.path.remove(str(REPO_ROOT))
    dvc_yaml = edited_dvc_yaml(tmp_path, train_standard_after_audit)
    calls: list[tuple[str, str | None]] = []
    monkeypatch.setattr(bench, "PLAIN_CALLS", {command: (lambda command: lambda params, kind: calls.append(
        (command, kind)))(command) for command in bench.PLAIN_CALLS})
    monkeypatch.chdir(dvc_yaml.parent)
    bench.plain_pipeline([])
    assert calls == calls_of(dvc_yaml, names(load_pipeline(dvc_yaml).order()))
    assert calls[4] == ("train", "standard")  # after ingest, poison, train_suspect, audit
    assert set(bench.PLAIN_CALLS) == set(STAGE_CALLS)


def test_without_dvc_yaml_the_flows_name_the_missing_file(tmp_path, monkeypatch, recorded):
    missing = tmp_path / "site-packages" / "robustdata" / "dvc.yaml"  # where an installed package would look
    monkeypatch.setattr(stages_module, "DVC_YAML", missing)
    for run in (lambda: pipeline_flow.fn(Params()), lambda: audit_loop_flow.fn(Params(), plant=True),
                lambda: scheduled_audit_flow.fn(str(tmp_path / "params.yaml"))):
        with pytest.raises(RobustDataError, match=re.escape(f"{missing} not found")):
            run()
    assert recorded == []


def test_a_stage_that_is_not_a_robustdata_command_is_refused_before_anything_runs(tmp_path, monkeypatch, recorded):
    def add_script(stages: dict) -> None:
        stages["summary"] = {"cmd": "python scripts/summary.py", "deps": ["reports/index.md"], "outs": ["summary.txt"]}

    with pytest.raises(RobustDataError, match="stage 'summary' runs 'python scripts/summary.py'"):
        load_pipeline(edited_dvc_yaml(tmp_path, add_script))

    def unknown_kind(stages: dict) -> None:
        stages["build_det"]["cmd"] = "robustdata build --kind sideways --params params.yaml"

    monkeypatch.setattr(stages_module, "DVC_YAML", edited_dvc_yaml(tmp_path / "other", unknown_kind))
    with pytest.raises(RobustDataError, match="unknown --kind 'sideways'"):
        pipeline_flow.fn(Params())
    assert recorded == []

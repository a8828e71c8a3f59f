"""The pipeline's stages as dvc.yaml defines them, and the flow call each stage's command makes.

dvc.yaml is the one place the pipeline's order lives (DESIGN.md section 2). The flows that run several
stages in one process (`robustdata pipeline`, the scheduled audit, the audit loop) and the pipeline
benchmark read it here: which stages exist, what each depends on (a stage's deps that are another's outs,
as DVC resolves them), and the order `dvc repro` runs them in (DVC's own graph and plan). What a stage
does is its `cmd`, `robustdata <command> [--kind K] ...`; STAGE_CALLS maps each command to the flow or
task call that command makes, and is not an order.
"""

from __future__ import annotations

import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterable

from robustdata.config import BUILD_KINDS, EVALUATED_KINDS, TRAIN_KINDS, Params
from robustdata.errors import RobustDataError

if TYPE_CHECKING:
    import networkx as nx

# flows/ of a clone of the repository (robustdata/flows links to it); an installed wheel has no dvc.yaml
REPO_ROOT = Path(__file__).resolve().parent.parent
DVC_YAML = REPO_ROOT / "dvc.yaml"


@dataclass(frozen=True)
class Stage:
    """One dvc.yaml stage: its name, and the `robustdata` command (with its --kind) that its cmd runs."""

    name: str
    command: str
    kind: str | None


@dataclass(frozen=True)
class Pipeline:
    """dvc.yaml's stages and their DAG: `graph` has an edge from each stage to every stage it depends on
    (DVC's direction), with stage names as nodes."""

    path: Path
    stages: dict[str, Stage]
    graph: "nx.DiGraph"

    def stage(self, name: str) -> Stage:
        if name not in self.stages:
            raise RobustDataError(f"{self.path} has no stage {name!r}; its stages: {list(self.stages)}")
        return self.stages[name]

    def order(self, targets: Iterable[str] | None = None) -> list[Stage]:
        """The stages `dvc repro [targets]` runs, in its order: every stage, or the targets and all they
        depend on."""
        from dvc.repo.reproduce import plan_repro

        names = [self.stage(name).name for name in targets] if targets is not None else None
        return [self.stages[name] for name in plan_repro(self.graph, names)]

    def between(self, first: str, last: str) -> list[Stage]:
        """The stages from `first` to `last`: those that depend on `first` (or are it) and that `last`
        depends on (or is), in `dvc repro`'s order."""
        import networkx as nx

        downstream = nx.ancestors(self.graph, self.stage(first).name) | {first}
        return [stage for stage in self.order([last]) if stage.name in downstream]


def load_pipeline(dvc_yaml: Path | None = None) -> Pipeline:
    """dvc.yaml's stages and DAG, read by DVC (so `${...}` values come from the params.yaml beside it,
    as in `dvc repro`). Default: the dvc.yaml of the repository this code runs from."""
    path = Path(dvc_yaml or DVC_YAML).resolve()
    if not path.is_file():
        raise RobustDataError(
            f"{path} not found: the pipeline's stages and their order come from the repository's dvc.yaml; run "
            f"the pipeline, the audit loop and the scheduled audit from a clone of the repository (an installed "
            f"package has no dvc.yaml)")
    import networkx as nx
    from dvc.dvcfile import load_file
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.repo.graph import build_graph

    try:
        # only reads: no .dvc/ needed (uninitialized), and no repository lock taken, so a `dvc repro` may run
        with Repo(str(path.parent), uninitialized=True) as repo, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # DVC's own use of pygtrie, nothing to act on
            dvc_stages = list(load_file(repo, str(path)).stages.values())
            dvc_graph = build_graph(dvc_stages)
    except DvcException as exc:
        raise RobustDataError(f"{path}: {exc}") from exc
    stages = {stage.name: parse_command(path, stage.name, stage.cmd) for stage in dvc_stages}
    # the same nodes and edges in the same insertion order, so DVC's plan is unchanged by the relabelling
    graph = nx.relabel_nodes(dvc_graph, {stage: stage.name for stage in dvc_stages}, copy=True)
    return Pipeline(path, stages, graph)


def parse_command(path: Path, name: str, cmd: Any) -> Stage:
    """The Stage of a `robustdata <command> [--kind K] ...` cmd; anything else is an error that says why."""
    words = shlex.split(cmd) if isinstance(cmd, str) else []
    if len(words) < 2 or Path(words[0]).name != "robustdata":
        raise RobustDataError(f"{path}: stage {name!r} runs {cmd!r}; a pipeline flow runs only stages whose cmd "
                              f"is one `robustdata <command> ...` (commands: {sorted(STAGE_CALLS)})")
    kind = None
    for index, word in enumerate(words):
        if word == "--kind" and index + 1 < len(words):
            kind = words[index + 1]
        elif word.startswith("--kind="):
            kind = word.split("=", 1)[1]
    return Stage(name, words[1], kind)


@dataclass(frozen=True)
class StageCall:
    """What a command runs in a pipeline flow: `run(params, kind)`, and the --kind values it takes."""

    run: Callable[[Params, Any], Any]
    kinds: Collection[str] = ()
    default_kind: str | None = None


STAGE_CALLS: dict[str, StageCall] = {}


def stage_call(command: str, kinds: Collection[str] = (), default_kind: str | None = None):
    def register(run: Callable[[Params, Any], Any]) -> Callable[[Params, Any], Any]:
        STAGE_CALLS[command] = StageCall(run, kinds, default_kind)
        return run
    return register


def check_runnable(stages: Iterable[Stage]) -> None:
    """Every stage's command and kind known, before any of them runs."""
    for stage in stages:
        call = STAGE_CALLS.get(stage.command)
        if call is None:
            raise RobustDataError(f"stage {stage.name!r} runs `robustdata {stage.command}`, which a pipeline flow "
                                  f"cannot run; known commands: {sorted(STAGE_CALLS)}")
        kind = stage.kind or call.default_kind
        if call.kinds and kind not in call.kinds:
            raise RobustDataError(f"stage {stage.name!r}: unknown --kind {stage.kind!r} for `robustdata "
                                  f"{stage.command}`; valid: {sorted(call.kinds)}")


def run_stages(stages: list[Stage], params: Params) -> dict[str, Any]:
    """Run the stages in the given order in this process (each as its command's flow or task would run in
    its own); each stage's result by stage name."""
    check_runnable(stages)
    results: dict[str, Any] = {}
    for stage in stages:
        call = STAGE_CALLS[stage.command]
        results[stage.name] = call.run(params, stage.kind or call.default_kind)
    return results


# Each command's call, as flows/pipeline.py made it before the order moved to dvc.yaml. Imports are local:
# the flow modules import this one.

@stage_call("ingest")
def _ingest(params: Params, kind: None) -> Any:
    from robustdata.flows.ingest import ingest_flow

    return ingest_flow(params.ingest)


@stage_call("poison")
def _poison(params: Params, kind: None) -> Any:
    from robustdata.tasks.audit import poison_task

    return poison_task(params.poison)


@stage_call("train", kinds=TRAIN_KINDS, default_kind="standard")
def _train(params: Params, kind: str) -> Any:
    from robustdata.tasks.train import train_task

    return train_task(getattr(params, TRAIN_KINDS[kind]))


@stage_call("evaluate")
def _evaluate(params: Params, kind: None) -> Any:
    from robustdata.flows.train import evaluate_flow

    return evaluate_flow(params.evaluate)


@stage_call("audit")
def _audit(params: Params, kind: None) -> Any:
    from robustdata.flows.audit import audit_flow

    return audit_flow(params.audit)


@stage_call("retrain-clean")
def _retrain_clean(params: Params, kind: None) -> Any:
    from robustdata.flows.audit import retrain_clean_flow

    return retrain_clean_flow(params.retrain_clean, params.audit_eval)


@stage_call("build", kinds=BUILD_KINDS)
def _build(params: Params, kind: str) -> Any:
    from robustdata.flows.robustify import run_build

    return run_build(getattr(params, f"build_{kind}"))


@stage_call("evaluate-built", kinds=EVALUATED_KINDS)
def _evaluate_built(params: Params, kind: str) -> Any:
    from robustdata.config import dataset_for
    from robustdata.flows.robustify import evaluate_built_flow

    return evaluate_built_flow(kind, *dataset_for(kind, params), params.robustify_eval)


@stage_call("robustify-report")
def _robustify_report(params: Params, kind: None) -> Any:
    from robustdata.flows.robustify import robustify_report_flow

    return robustify_report_flow(params)


@stage_call("results")
def _results(params: Params, kind: None) -> Any:
    from robustdata.tasks.report import index_task

    return index_task(params)

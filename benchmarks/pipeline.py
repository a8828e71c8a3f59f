#!/usr/bin/env python
"""Benchmark: what Prefect and DVC add to each stage of a pipeline run (orchestration overhead, s/stage).

`robustdata repro` (`dvc repro` of dvc.yaml: every stage a `robustdata` process running its Prefect flow)
runs in a fresh copy of the repository, against a Prefect server that the benchmark starts (Prefect's own
temporary server) and reads back afterwards. Per stage:

- wall: from DVC's "Running stage" line to the next stage's (the stage's process, and DVC's own work on it:
  checking deps, hashing outs, writing dvc.lock);
- flow body: the stage's top-level flow run as the server recorded it, from Running to its final state (the
  flow's body, tasks included); none for a stage that runs no flow (`results` writes its page without
  Prefect), whose wall time counts whole as overhead;
- overhead = wall - flow body: the interpreter's start, imports, parameter checks, the flow run's creation
  and teardown, DVC.

Medians over --repeats. Targets (issue 18): at most 3 s per stage on 2 cores; and the full profile's
overhead under 2%, by arithmetic: mean overhead per stage x dvc.yaml's stages (+ one server start), over
the full profile's wall time (about 2.5 h = 9000 s on 2 cores, README; the builds and evaluations alone
took `quality.seconds` of reports/bench/robustify.json, a lower bound that gives the worst case). The old
whole-run ratio target (<= 1.05) is retired.

With --plain (the default) each repeat also runs the same work as plain library calls in one process: each
stage's task bodies (`.fn`), in dvc.yaml's order. That is each stage's body in a warm process, for
comparison: wall - plain body adds what a fresh process pays on its first steps (kernels, caches).

    python benchmarks/pipeline.py [--repeats 1] [--profile full] [--targets poison] [--worktree] [--no-plain]

--targets runs only those stages and what they depend on (a quick check: `--targets poison` is ingest and
poison); --worktree benchmarks the working tree's files (changes recorded) instead of the last commit.
Prints tables and writes reports/bench/pipeline.json (bench-work/pipeline/partial.json with --targets).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from robustdata.io import code_version, write_json_atomic  # noqa: E402

log = Console(stderr=True)
BIN = Path(sys.executable).parent
PLAIN_STAGES = "plain-stages.json"  # written by plain_pipeline in the copy: seconds per DVC stage name
TARGET_SECONDS_PER_STAGE = 3.0
TARGET_FULL_PROFILE_PERCENT = 2.0
FULL_PROFILE_SECONDS = 9000.0  # README: the full profile takes about 2.5 h on 2 CPU cores
ROBUSTIFY_BENCH = REPO / "reports/bench/robustify.json"  # quality.seconds: the full profile's builds + evaluations


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout


def worktree_changes() -> list[str]:
    """Tracked files changed or deleted, and untracked files not ignored, relative to the repository."""
    out = git("ls-files", "-z", "--modified", "--others", "--exclude-standard")
    return sorted({path for path in out.split("\0") if path})


def fresh_copy(work: Path, worktree: bool, profile: str | None) -> Path:
    """The last commit (or the working tree) in its own git repository (DVC needs one), nothing built yet;
    params.yaml holds the profile's merged params when one is given."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    subprocess.run(["git", "clone", "--quiet", "--local", "--no-hardlinks", str(REPO), str(work)], check=True)
    if worktree:
        for path in worktree_changes():
            source, copy = REPO / path, work / path
            if copy.is_symlink() or copy.is_file():
                copy.unlink()
            if source.is_symlink() or source.is_file():
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, copy, follow_symlinks=False)
    if profile:
        merged = subprocess.run([str(BIN / "robustdata"), "show-params", "--profile", profile], cwd=work, check=True,
                                capture_output=True, text=True).stdout
        (work / "params.yaml").write_text(merged)
    return work


# ---- plain run: the stages' task bodies in one process ---------------------------------------------------

def plain_ingest(params, kind) -> None:
    from robustdata.io import atomic_directory
    from robustdata.tasks import ingest

    info = ingest.prepare_source.fn(params.ingest)
    with atomic_directory(Path(params.ingest.out)) as staging:
        summaries = [ingest.ingest_split_task.fn(params.ingest, split, staging / split) for split in info["splits"]]
        ingest.write_index.fn(staging, info["name"], params.ingest.source, info["classes"], summaries)


def plain_poison(params, kind) -> None:
    from robustdata.tasks import audit

    audit.poison_task.fn(params.poison, progress=False)


def plain_train(params, kind) -> None:
    from robustdata.config import TRAIN_KINDS
    from robustdata.tasks import train

    train.train_task.fn(getattr(params, TRAIN_KINDS[kind]), progress=False)


def plain_evaluate(params, kind) -> None:
    from robustdata.tasks import train

    results = [train.evaluate_task.fn(params.evaluate, model, progress=False) for model in params.evaluate.models]
    train.write_evaluation.fn(params.evaluate.out, results)


def plain_audit(params, kind) -> None:
    from robustdata.tasks import audit

    audit.audit_task.fn(params.audit, progress=False)


def plain_retrain_clean(params, kind) -> None:
    from robustdata.tasks import audit, train

    train.train_task.fn(params.retrain_clean, progress=False)
    audit.audit_eval_task.fn(params.audit_eval, progress=False)


def plain_build(params, kind) -> None:
    from robustdata.tasks import robustify

    build = getattr(params, f"build_{kind}")
    for index in robustify.plan_build_task.fn(build)["missing"]:
        robustify.build_shard_task.fn(build, index)
    robustify.finish_build_task.fn(build)


def plain_evaluate_built(params, kind) -> None:
    from robustdata.config import dataset_for
    from robustdata.tasks import robustify

    data, limit = dataset_for(kind, params)
    evaluation = params.robustify_eval
    runs = [robustify.evaluate_on_task.fn(robustify.train_on_task.fn(kind, data, limit, evaluation, seed), evaluation)
            for seed in evaluation.seeds]
    robustify.write_kind_results.fn(kind, data, runs, evaluation)


def plain_robustify_report(params, kind) -> None:
    from robustdata.config import BUILD_KINDS
    from robustdata.tasks import robustify

    builds = {kind: getattr(params, f"build_{kind}") for kind in BUILD_KINDS}
    robustify.robustify_report_task.fn(builds, params.robustify_eval, params.build_robust.data,
                                       params.build_robust.model, params.build_nonrobust.model)


def plain_results(params, kind) -> None:
    from robustdata.tasks import report

    report.index_task.fn(params)


# each command's work as plain calls (flows/stages.py's STAGE_CALLS with every task replaced by its `.fn`)
PLAIN_CALLS: dict[str, Callable[[Any, Any], None]] = {
    "ingest": plain_ingest, "poison": plain_poison, "train": plain_train, "evaluate": plain_evaluate,
    "audit": plain_audit, "retrain-clean": plain_retrain_clean, "build": plain_build,
    "evaluate-built": plain_evaluate_built, "robustify-report": plain_robustify_report, "results": plain_results}


def plain_pipeline(targets: list[str]) -> None:
    """dvc.yaml's stages (or the targets and what they depend on) in `dvc repro`'s order, as plain calls;
    writes each stage's seconds to PLAIN_STAGES. Runs in the copy, in a fresh interpreter."""
    import robustdata.flows.robustify  # noqa: F401  imports before the clock starts, as a stage's come before its flow
    import robustdata.tasks.audit  # noqa: F401
    import robustdata.tasks.ingest  # noqa: F401
    import robustdata.tasks.report  # noqa: F401
    import robustdata.tasks.robustify  # noqa: F401
    import robustdata.tasks.train  # noqa: F401
    from robustdata.config import load_params
    from robustdata.flows.stages import STAGE_CALLS, check_runnable, load_pipeline

    params = load_params("params.yaml")
    stages = load_pipeline(Path("dvc.yaml")).order(targets or None)
    check_runnable(stages)
    missing = sorted({stage.command for stage in stages} - set(PLAIN_CALLS))
    if missing:
        raise SystemExit(f"benchmarks/pipeline.py has no plain call for {missing}: add them to PLAIN_CALLS")
    seconds: dict[str, float] = {}
    for stage in stages:
        start = time.perf_counter()
        PLAIN_CALLS[stage.command](params, stage.kind or STAGE_CALLS[stage.command].default_kind)
        seconds[stage.name] = time.perf_counter() - start
    Path(PLAIN_STAGES).write_text(json.dumps(seconds))


def plain_run(repo: Path, targets: list[str]) -> tuple[float, dict[str, float]]:
    """The plain run in a fresh interpreter (its imports counted in the wall time, not in a stage's)."""
    script = "import sys, benchmarks.pipeline as b; b.plain_pipeline(sys.argv[1:])"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", script, *targets], cwd=repo, check=True,
                   env={**os.environ, "PYTHONPATH": str(repo)}, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, json.loads((repo / PLAIN_STAGES).read_text())


# ---- orchestrated run: robustdata repro, timed by DVC's output and the Prefect server's records ----------

def orchestrated_run(repo: Path, api_url: str, targets: list[str]) -> tuple[float, dict[str, tuple[float, float]]]:
    """`robustdata repro [targets]` in the copy against the server at `api_url`: the wall time, and each
    stage's (start, end) as wall-clock timestamps, from the lines where DVC starts each stage."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_API_URL": api_url,
           "PYTHONPATH": str(repo),  # the copy's code, not the editable install's
           "PYTHONUNBUFFERED": "1"}  # DVC's "Running stage" lines arrive when they are written
    start = time.time()
    process = subprocess.Popen([str(BIN / "robustdata"), "repro", *targets], cwd=repo, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marks: list[tuple[str, float]] = []
    tail: deque[str] = deque(maxlen=40)
    try:
        for line in process.stdout:
            tail.append(line)
            if line.startswith("Running stage '"):
                marks.append((line.split("'")[1], time.time()))
        code = process.wait()
    finally:
        stop(process)  # when the benchmark itself is stopped: `robustdata repro` stops dvc and its stage
    end = time.time()
    if code != 0:
        raise SystemExit(f"robustdata repro failed with exit code {code} in {repo}:\n{''.join(tail)}")
    ends = [at for _, at in marks[1:]] + [end]
    return end - start, {name: (begin, stop) for (name, begin), stop in zip(marks, ends)}


def stop(process: subprocess.Popen, timeout: float = 60) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def flow_run_seconds(api_url: str, windows: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Per stage: the Running-to-final time of the top-level flow runs that started within its window."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentTaskRunId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    top_level = FlowRunFilter(parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True))
    runs = []
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        while True:
            # limit and sort given: Prefect 3.8.8's client sends null for those left out, which its server refuses
            page = client.read_flow_runs(flow_run_filter=top_level, limit=200, sort=FlowRunSort.ID_DESC,
                                         offset=len(runs))
            runs.extend(page)
            if len(page) < 200:
                break
    seconds = {name: 0.0 for name in windows}
    for run in runs:
        if run.start_time is None or run.end_time is None:
            continue
        began = run.start_time.timestamp()
        for name, (begin, stop) in windows.items():
            if begin <= began < stop:
                seconds[name] += run.end_time.timestamp() - began
    return seconds


# ---- report ----------------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
                            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")]
        info["cpu_model"] = models[0] if models else None
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        total_kb = int(meminfo.read_text().split("MemTotal:", 1)[1].split()[0])
        info["memory_gib"] = round(total_kb / 2**20, 1)
    return info


def full_profile_arithmetic(per_stage: float, num_stages: int, server_start: float) -> dict[str, Any]:
    """The full profile's overhead as a share of its wall time: the README's figure, and the worst case
    over the builds + evaluations measured alone (a lower bound of the full profile's wall time)."""
    overhead = per_stage * num_stages + server_start
    percent = 100 * overhead / FULL_PROFILE_SECONDS
    result: dict[str, Any] = {
        "stages": num_stages, "overhead_seconds_per_stage": per_stage, "server_start_seconds": server_start,
        "overhead_seconds": overhead, "full_profile_seconds": FULL_PROFILE_SECONDS,
        "full_profile_seconds_source": "README: about 2.5 h on 2 CPU cores", "percent": percent,
        "target_percent": TARGET_FULL_PROFILE_PERCENT, "met": percent < TARGET_FULL_PROFILE_PERCENT}
    if ROBUSTIFY_BENCH.exists():
        measured = json.loads(ROBUSTIFY_BENCH.read_text())["quality"]["seconds"]
        result["worst_case"] = {
            "full_profile_seconds": measured, "percent": 100 * overhead / measured,
            "source": "reports/bench/robustify.json quality.seconds: the full profile's builds and evaluations "
                      "alone, a lower bound of its wall time"}
    return result


def summarise(stage_walls: list[dict[str, float]], stage_bodies: list[dict[str, float]],
              plain_bodies: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    stages: dict[str, dict[str, Any]] = {}
    for name in stage_walls[0]:
        walls = [run[name] for run in stage_walls]
        bodies = [run[name] for run in stage_bodies]
        overheads = [wall - body for wall, body in zip(walls, bodies)]
        stages[name] = {"wall_seconds": walls, "flow_body_seconds": bodies, "overhead_seconds": overheads,
                        "median_overhead_seconds": statistics.median(overheads)}
        if plain_bodies:
            plain = [run[name] for run in plain_bodies]
            stages[name]["plain_body_seconds"] = plain
            stages[name]["median_wall_minus_plain_seconds"] = statistics.median(walls) - statistics.median(plain)
    return stages


def print_tables(report: dict[str, Any]) -> None:
    console = Console(width=160)
    table = Table(title="orchestration overhead per stage (median s): stage wall time - its flow body")
    columns = ["stage", "wall", "flow body", "overhead"] + (["plain body", "wall - plain"] if report["plain"] else [])
    for column in columns:
        table.add_column(column, justify="right")
    for name, stage in report["stages"].items():
        row = [name, f"{statistics.median(stage['wall_seconds']):.1f}",
               f"{statistics.median(stage['flow_body_seconds']):.1f}", f"{stage['median_overhead_seconds']:.2f}"]
        if report["plain"]:
            row += [f"{statistics.median(stage['plain_body_seconds']):.1f}",
                    f"{stage['median_wall_minus_plain_seconds']:+.1f}"]
        table.add_row(*row)
    console.print(table)
    summary, full = report["overhead_seconds_per_stage"], report["targets"]["full_profile"]
    console.print(f"overhead per stage: mean {summary['mean']:.2f} s, max {summary['max']:.2f} s "
                  f"({summary['max_stage']}); target <= {TARGET_SECONDS_PER_STAGE:g} s per stage: "
                  f"{'met' if report['targets']['per_stage']['met'] else 'NOT met'}")
    line = (f"full profile: {full['stages']} stages x {summary['mean']:.2f} s + server start "
            f"{full['server_start_seconds']:.1f} s = {full['overhead_seconds']:.0f} s of "
            f"{full['full_profile_seconds']:.0f} s = {full['percent']:.2f}% (target < {TARGET_FULL_PROFILE_PERCENT:g}%: "
            f"{'met' if full['met'] else 'NOT met'})")
    if "worst_case" in full:
        line += f"; worst case over {full['worst_case']['full_profile_seconds']:.0f} s: {full['worst_case']['percent']:.2f}%"
    console.print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="Runs of each (about 8 + 7 min per repeat on 2 cores).")
    parser.add_argument("--profile", default=None, help="A profile laid over params.yaml (quick when left out).")
    parser.add_argument("--targets", nargs="+", default=[], help="Only these stages and what they depend on.")
    parser.add_argument("--worktree", action="store_true", help="Benchmark the working tree, not the last commit.")
    parser.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True,
                        help="Also run the stages' bodies as plain calls in one process (for comparison).")
    parser.add_argument("--work", type=Path, default=REPO / "bench-work" / "pipeline")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped, it still stops what it started
    out = args.out or (args.work / "partial.json" if args.targets else REPO / "reports/bench/pipeline.json")
    home = args.work / "prefect-home"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    os.environ["PREFECT_HOME"] = str(home)  # before Prefect is imported: the benchmark's server has its own database
    from prefect.server.api.server import SubprocessASGIServer

    from robustdata.flows.stages import load_pipeline

    num_stages = len(load_pipeline(REPO / "dvc.yaml").stages)
    server = SubprocessASGIServer()
    began = time.perf_counter()
    server.start(timeout=120)
    server_start = time.perf_counter() - began
    walls, stage_walls, stage_bodies, plain_walls, plain_bodies = [], [], [], [], []
    try:
        for repeat in range(args.repeats):
            if args.plain:
                wall, seconds = plain_run(fresh_copy(args.work / "plain", args.worktree, args.profile), args.targets)
                plain_walls.append(wall)
                plain_bodies.append(seconds)
                log.log(f"repeat {repeat}: plain {wall:.0f} s")
            repo = fresh_copy(args.work / "orchestrated", args.worktree, args.profile)
            wall, windows = orchestrated_run(repo, server.api_url, args.targets)
            walls.append(wall)
            stage_walls.append({name: stop - begin for name, (begin, stop) in windows.items()})
            stage_bodies.append(flow_run_seconds(server.api_url, windows))
            log.log(f"repeat {repeat}: robustdata repro {wall:.0f} s")
    finally:
        server.stop()
    stages = summarise(stage_walls, stage_bodies, plain_bodies)
    medians = {name: stage["median_overhead_seconds"] for name, stage in stages.items()}
    worst = max(medians, key=medians.get)
    mean = statistics.mean(medians.values())
    report: dict[str, Any] = {
        "benchmark": "orchestration overhead per stage: stage wall time - its flow body (median over repeats)",
        "command": shlex.join([sys.executable, *sys.argv]), "cwd": os.getcwd(),
        "commit": git("rev-parse", "HEAD").strip(),
        "worktree": args.worktree, "worktree_changes": worktree_changes() if args.worktree else [],
        "profile": args.profile or "quick (params.yaml)", "dvc_targets": args.targets or None,
        "repeats": args.repeats, "plain": args.plain, "machine": machine(), "built_by": code_version(),
        "server_start_seconds": server_start, "orchestrated_seconds": walls, "plain_seconds": plain_walls,
        "stages": stages,
        "overhead_seconds_per_stage": {"mean": mean, "median": statistics.median(medians.values()),
                                       "max": medians[worst], "max_stage": worst},
        "targets": {"per_stage": {"target_seconds": TARGET_SECONDS_PER_STAGE, "max_stage_seconds": medians[worst],
                                  "met": medians[worst] <= TARGET_SECONDS_PER_STAGE},
                    "full_profile": full_profile_arithmetic(mean, num_stages, server_start)},
    }
    write_json_atomic(out, report)
    print_tables(report)
    log.log(f"wrote {out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Benchmark: what Prefect and DVC add to the quick profile's wall time.

Two copies of the repository (its committed files) run the same quick-profile work:

- orchestrated: `robustdata repro`, i.e. `dvc repro` of dvc.yaml, every stage a `robustdata` process
  running its Prefect flow, against one Prefect server (started for the run, and counted);
- plain: one Python process calling the same task functions' bodies (`.fn`) in the same order,
  with no Prefect run, no DVC and no per-stage process.

Runs alternate (plain, orchestrated, plain, ...) and the ratio of the medians is reported, with each
DVC stage's own wall time. Target (issue 6): orchestrated / plain <= 1.05.

    python benchmarks/pipeline.py [--repeats 1] [--work bench-work/pipeline]

Prints a table and writes reports/bench/pipeline.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from robustdata.io import code_version, write_json_atomic  # noqa: E402

log = Console(stderr=True)
BIN = Path(sys.executable).parent


def fresh_copy(work: Path) -> Path:
    """The committed tree in its own git repository (DVC needs one), with nothing built yet."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    subprocess.run(["git", "clone", "--quiet", "--local", "--no-hardlinks", str(REPO), str(work)], check=True)
    return work


PLAIN_STAGES = "plain-stages.json"  # written by plain_pipeline in the copy: seconds per DVC stage name


def plain_run(repo: Path) -> tuple[float, dict[str, float]]:
    """The quick profile's work as plain calls in a fresh interpreter (imports counted, as a stage's are);
    the wall time, and each stage's share."""
    script = "import benchmarks.pipeline as b; b.plain_pipeline()"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", script], cwd=repo, check=True, env={**os.environ, "PYTHONPATH": str(repo)},
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, json.loads((repo / PLAIN_STAGES).read_text())


@contextlib.contextmanager
def timed(stages: dict[str, float], name: str):
    start = time.perf_counter()
    yield
    stages[name] = time.perf_counter() - start


def plain_pipeline() -> None:
    """flows/pipeline.py's steps with every Prefect task replaced by its function (`.fn`)."""
    from robustdata.config import load_params
    from robustdata.io import atomic_directory
    from robustdata.config import BUILD_KINDS as KINDS
    from robustdata.flows.robustify import dataset_for
    from robustdata.tasks import audit, ingest, report, robustify, train

    params = load_params("params.yaml")
    stages: dict[str, float] = {}
    with timed(stages, "ingest"):
        info = ingest.prepare_source.fn(params.ingest)
        with atomic_directory(Path(params.ingest.out)) as staging:
            summaries = [ingest.ingest_split_task.fn(params.ingest, split, staging / split)
                         for split in info["splits"]]
            ingest.write_index.fn(staging, info["name"], params.ingest.source, info["classes"], summaries)
    with timed(stages, "poison"):
        audit.poison_task.fn(params.poison, progress=False)
    with timed(stages, "train_suspect"):
        train.train_task.fn(params.train_suspect, progress=False)
    with timed(stages, "audit"):
        audit.audit_task.fn(params.audit, progress=False)
    with timed(stages, "retrain_clean"):
        train.train_task.fn(params.retrain_clean, progress=False)
        audit.audit_eval_task.fn(params.audit_eval, progress=False)
    for name in ("train_standard", "train_plain", "train_robust"):
        with timed(stages, name):
            train.train_task.fn(getattr(params, name), progress=False)
    with timed(stages, "evaluate"):
        train.write_evaluation.fn(params.evaluate.out, [train.evaluate_task.fn(params.evaluate, model, progress=False)
                                                        for model in params.evaluate.models])
    for kind in KINDS:
        with timed(stages, f"build_{kind}"):
            build = getattr(params, f"build_{kind}")
            planned = robustify.plan_build_task.fn(build)
            for index in planned["missing"]:
                robustify.build_shard_task.fn(build, index)
            robustify.finish_build_task.fn(build)
    for kind in ("original", *KINDS):
        with timed(stages, f"evaluate_{kind}"):
            data, limit = dataset_for(kind, params)
            runs = [robustify.evaluate_on_task.fn(robustify.train_on_task.fn(kind, data, limit,
                                                                             params.robustify_eval, seed),
                                                  params.robustify_eval)
                    for seed in params.robustify_eval.seeds]
            robustify.write_kind_results.fn(kind, data, runs, params.robustify_eval)
    with timed(stages, "robustify_report"):
        builds = {kind: getattr(params, f"build_{kind}") for kind in KINDS}
        robustify.robustify_report_task.fn(builds, params.robustify_eval, params.build_robust.data,
                                           params.build_robust.model, params.build_nonrobust.model)
    with timed(stages, "results"):
        report.index_task.fn(params)
    Path(PLAIN_STAGES).write_text(json.dumps(stages))


def orchestrated_run(repo: Path) -> tuple[float, dict[str, float]]:
    """`robustdata repro` in the copy; the wall time, and each stage's from DVC's output timestamps."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PREFECT_API_URL", None)
    start = time.perf_counter()
    process = subprocess.Popen([str(BIN / "robustdata"), "repro"], cwd=repo, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    stages: dict[str, float] = {}
    current, since = None, start
    for line in process.stdout:  # "Running stage 'name':" marks each stage's start
        if line.startswith("Running stage '"):
            now = time.perf_counter()
            if current:
                stages[current] = now - since
            current, since = line.split("'")[1], now
    if process.wait() != 0:
        raise SystemExit(f"robustdata repro failed in {repo}")
    wall = time.perf_counter() - start
    if current:
        stages[current] = time.perf_counter() - since
    return wall, stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="Runs of each (about 2 x 12 min per repeat on CPU).")
    parser.add_argument("--work", type=Path, default=REPO / "bench-work" / "pipeline")
    parser.add_argument("--out", type=Path, default=REPO / "reports/bench/pipeline.json")
    args = parser.parse_args()
    plain, orchestrated, stage_times, plain_stage_times = [], [], [], []
    for repeat in range(args.repeats):
        repo = fresh_copy(args.work / "plain")
        wall, stages = plain_run(repo)
        plain.append(wall)
        plain_stage_times.append(stages)
        log.log(f"repeat {repeat}: plain {plain[-1]:.0f} s")
        repo = fresh_copy(args.work / "orchestrated")
        wall, stages = orchestrated_run(repo)
        orchestrated.append(wall)
        stage_times.append(stages)
        log.log(f"repeat {repeat}: dvc + prefect {wall:.0f} s")
    ratio = statistics.median(orchestrated) / statistics.median(plain)
    report: dict[str, Any] = {
        "plain_seconds": plain, "orchestrated_seconds": orchestrated, "ratio_of_medians": ratio,
        "target": 1.05, "met": ratio <= 1.05, "stages_seconds": stage_times,
        "plain_stages_seconds": plain_stage_times,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "built_by": code_version()}
    write_json_atomic(args.out, report)
    table = Table(title="quick profile wall time: Prefect + DVC vs plain library calls (median s)")
    for column in ("plain", "dvc repro + prefect", "ratio", "target"):
        table.add_column(column, justify="right")
    table.add_row(f"{statistics.median(plain):.0f}", f"{statistics.median(orchestrated):.0f}", f"{ratio:.3f}", "1.05")
    Console(width=160).print(table)
    table = Table(title="per stage (median s): DVC stage wall time vs the same calls in the plain run")
    for column in ("stage", "plain", "dvc + prefect", "difference"):
        table.add_column(column, justify="right")
    for name in stage_times[0]:
        ours = statistics.median(s[name] for s in stage_times)
        bare = statistics.median(s.get(name, 0.0) for s in plain_stage_times)
        table.add_row(name, f"{bare:.1f}", f"{ours:.1f}", f"{ours - bare:+.1f}")
    Console(width=160).print(table)
    log.log(f"wrote {args.out}")


if __name__ == "__main__":
    main()

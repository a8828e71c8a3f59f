"""`robustdata` command line. Commands run Prefect flows; errors in the input print one line naming the
file and key and exit non-zero, before any flow starts. SIGTERM and SIGINT stop a command with the
processes it started (the temporary Prefect server of a flow run, `dvc repro` and its stage)."""

from __future__ import annotations

import atexit
import glob
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from robustdata.version import __version__
from robustdata.allocator import keep_freed_memory
from robustdata.audit.methods import method_names
from robustdata.config import (BUILD_KINDS, EVALUATED_KINDS, TRAIN_KINDS, AuditParams, BuildParams,
                               EvaluateParams, IngestParams, Params, PoisonParams, TrainParams, dataset_for,
                               load_params)
from robustdata.errors import DataError, RobustDataError

# The machines this runs on have no route to Prefect's telemetry endpoint.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

app = typer.Typer(help="Audit image training sets for backdoor poisons and build robust datasets.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()
err_console = Console(stderr=True)

EXIT_CODES = {0: "success", 1: "unexpected failure (a bug: please report it with the traceback)",
              2: "bad input or configuration", 3: "integrity failure: data altered after it was written",
              4: "poisons detected (audit --fail-on-detect)",
              5: "audit inconclusive (audit --fail-on-detect without --allow-inconclusive)",
              130: "stopped by SIGINT (Ctrl-C)", 143: "stopped by SIGTERM"}
EXIT_POISONS_DETECTED = 4
EXIT_INCONCLUSIVE = 5
Checked = TypeVar("Checked")


class _QuietUserErrors(logging.Filter):
    """Drop tracebacks that Prefect logs for user errors: the CLI prints them as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], RobustDataError):
            record.exc_info, record.exc_text = None, None
        return True


QUIET_USER_ERRORS = _QuietUserErrors()


def run_guarded(command: Callable[[], Any], runs_flows: bool = True) -> Any:
    """Run a command's body: a RobustDataError becomes one line and its exit code. `runs_flows`: the body
    runs Prefect flows in this process (flows/runners.py: flow_runs_bound_to_this_process)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(QUIET_USER_ERRORS)  # the same filter once, however often this runs
    try:
        if not runs_flows:
            return command()
        from robustdata.flows.runners import flow_runs_bound_to_this_process

        with flow_runs_bound_to_this_process():
            return command()
    except RobustDataError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True, highlight=False, markup=True)
        raise typer.Exit(exc.exit_code) from None


def run_checked(check: Callable[[], Checked], command: Callable[[Checked], Any], runs_flows: bool = True) -> Any:
    """check(), then command(what check returned). `check` validates the params and the inputs the command
    reads, and imports neither Prefect nor torch nor the flows: a bad input comes back as one line in a
    fraction of a second, before a flow run starts a Prefect server."""
    checked = run_guarded(check, runs_flows=False)
    return run_guarded(lambda: command(checked), runs_flows)


def version_callback(value: bool) -> None:
    if value:
        console.print(f"robustdata {__version__}")
        raise typer.Exit()


# ------------------------------------------------------------------------------------------------ stopping

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_GRACE_S = 30  # after a stop signal, the time a command has to unwind before its children are killed
CHILD_GRACE_S = 5  # a child sent SIGTERM at the end has this long to exit before SIGKILL
_stopped_by: list[int] = []  # the stop signals received


class Stopped(BaseException):
    """Raised by a stop signal (SIGTERM, SIGINT) in the main thread. Like KeyboardInterrupt it unwinds the
    command: Prefect marks its flow run crashed, context managers and exit handlers stop what they started
    (Prefect's temporary server, a Dask cluster, `dvc repro`). A BaseException, so that `except Exception`
    does not swallow it, nor click turn it into "Aborted!" and exit code 1."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_on_signals() -> None:
    """SIGTERM and SIGINT raise Stopped. A second stop signal, or a command still running STOP_GRACE_S after
    the first (a task thread that does not return, an exit handler that hangs), stops the command's child
    processes and exits at once. Whatever child processes are left when a stopped command exits are stopped
    last (stop_children_when_stopped)."""
    atexit.register(stop_children_when_stopped)  # registered first: runs after the exit handlers of libraries
    for signum in STOP_SIGNALS:
        signal.signal(signum, on_stop_signal)


def on_stop_signal(signum: int, frame: Any) -> None:
    _stopped_by.append(signum)
    if len(_stopped_by) > 1:
        exit_now(signum)
    watchdog = threading.Timer(STOP_GRACE_S, exit_now, args=(signum,))
    watchdog.daemon = True
    watchdog.start()
    raise Stopped(signum)


def exit_now(signum: int) -> None:
    stop_processes(descendants(os.getpid()), grace=1)
    os._exit(128 + signum)


def stop_children_when_stopped() -> None:
    if _stopped_by:
        stop_processes(descendants(os.getpid()), grace=CHILD_GRACE_S)


def descendants(pid: int) -> list[int]:
    """The live processes below `pid`, parents first (Linux, from /proc; none found elsewhere)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if name.isdigit() and (stat := process_stat(int(name))) is not None and stat[0] != b"Z":
            children.setdefault(stat[1], []).append(int(name))
    found, parents = [], [pid]
    while parents:
        below = children.get(parents.pop(), [])
        found.extend(below)
        parents.extend(below)
    return found


def process_stat(pid: int) -> tuple[bytes, int] | None:
    """(state, parent pid) of a process, from /proc/PID/stat; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    state, parent = stat[stat.rindex(b")") + 2:].split()[:2]  # after the command name, which may hold spaces
    return state, int(parent)


def alive(pid: int) -> bool:
    stat = process_stat(pid)
    return stat is not None and stat[0] != b"Z"  # a zombie has exited; only its exit status waits to be read


def stop_processes(pids: list[int], grace: float) -> None:
    """SIGTERM to each process; SIGKILL to those still there after `grace` seconds."""
    for pid in pids:
        signal_process(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (left := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:
        signal_process(pid, signal.SIGKILL)


def signal_process(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def run() -> None:
    """The console entry point (and `python -m robustdata`): set the process up, then run the command."""
    keep_freed_memory()
    stop_on_signals()
    try:
        app()
    except (Stopped, SystemExit):
        if not _stopped_by:
            raise
        # stopped: exit as a stopped program does, also when a library swallowed the Stopped exception
        err_console.print(f"[bold red]stopped:[/] {signal.Signals(_stopped_by[0]).name}", highlight=False)
        sys.exit(128 + _stopped_by[0])


# ------------------------------------------------------------------------------ inputs, before any flow starts
# What a command reads must exist before its flow starts a Prefect server (about 12 s): these checks read only
# the file system, so that a missing input is one error line at once. The tasks check contents as they read.


def require_datasets(*roots: Path) -> None:
    """Each root is a finished dataset directory: its card.json, which is written last, is there."""
    for root in map(Path, roots):
        if not (root / "card.json").is_file():
            what = "no such directory" if not root.is_dir() else "card.json missing: not a finished dataset"
            raise DataError(f"{what} (run `robustdata ingest` to build one)", path=root)


def require_splits(data: Path, *splits: str) -> None:
    require_datasets(*(Path(data) / split for split in splits))


def require_files(*paths: Path) -> None:
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError("no such file", path=path)


def require_models(*directories: Path) -> None:
    """Each directory holds a trained model: its weights (model.pt) and their sidecar (model.json)."""
    for directory in map(Path, directories):
        missing = [name for name in ("model.pt", "model.json") if not (directory / name).is_file()]
        if missing:
            what = "no such directory" if not directory.is_dir() else f"{' and '.join(missing)} missing"
            raise DataError(f"{what}: not a trained model (run `robustdata train` to train one)", path=directory)


# the sources robustdata.data.sources.open_source reads (its SOURCE_KINDS: tests/test_cli.py checks they agree),
# here so that checking a spec imports nothing heavy
SOURCE_KINDS = ("mnist", "torchvision:NAME", "imagefolder:PATH", "shards:GLOB")


def require_source(spec: str) -> None:
    """An ingest's source is one of SOURCE_KINDS, an imagefolder:PATH names a directory and a shards:GLOB
    matches files; mnist and torchvision:NAME are fetched by the flow."""
    kind, _, arg = spec.partition(":")
    if not any(kind == known.split(":")[0] and bool(arg) == (":" in known) for known in SOURCE_KINDS):
        raise RobustDataError(f"unknown source {spec!r}; valid: {', '.join(SOURCE_KINDS)}")
    if kind == "imagefolder" and not Path(arg).is_dir():
        raise DataError("not a directory", path=arg)
    if kind == "shards" and not glob.glob(os.path.expanduser(arg), recursive=True):
        raise DataError("no shard files match this pattern", path=arg)


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Exit codes: 0 success, 1 bug, 2 bad input or configuration, 3 integrity failure,
    4 poisons detected, 5 audit inconclusive (audit --fail-on-detect), 130 / 143 stopped by SIGINT / SIGTERM."""


@app.command()
def ingest(
    source: Optional[str] = typer.Option(None, help=" | ".join(SOURCE_KINDS)),
    out: Optional[Path] = typer.Option(None, help="Output directory; one subdirectory per split."),
    params: Optional[Path] = typer.Option(None, help="params.yaml to read the `ingest` section from."),
    shard_size: Optional[int] = typer.Option(None, help="Samples per shard."),
    limit: Optional[int] = typer.Option(None, help="At most this many samples per split (quick runs)."),
    download: Optional[bool] = typer.Option(None, "--download/--no-download", help="Allow fetching inputs."),
    image_mode: Optional[str] = typer.Option(None, help="imagefolder colour mode: auto | L | RGB."),
    classes: Optional[str] = typer.Option(None, help="Comma-separated class names (shards without a card)."),
) -> None:
    """Ingest a source into webdataset shards + Parquet manifests + dataset cards, then print the card."""
    def check() -> IngestParams:
        config = load_params(params, ingest={
            "source": source, "out": out, "shard_size": shard_size, "limit": limit, "download": download,
            "image_mode": image_mode, "classes": classes.split(",") if classes else None})
        require_source(config.ingest.source)
        return config.ingest

    def command(checked: IngestParams) -> None:
        from robustdata.flows.ingest import ingest_flow

        print_summary(ingest_flow(checked))

    run_checked(check, command)


@app.command()
def train(
    kind: str = typer.Option("standard", help="The params section used: standard (train_standard) | robust "
                             "(train_robust, adversarial) | suspect (train_suspect) | clean (retrain_clean) | plain "
                             "(train_plain, the source of D_NR / D_rand / D_det)."),
    params: Optional[Path] = typer.Option(None, help="params.yaml to read the section from."),
    data: Optional[Path] = typer.Option(None, help="Ingest output with train/ and val/ splits."),
    out: Optional[Path] = typer.Option(None, help="Output directory for model.pt + model.json."),
    arch: Optional[str] = typer.Option(None, help="small_cnn | resnet18 | tv:NAME"),
    epochs: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    batch_size: Optional[int] = typer.Option(None),
    limit: Optional[int] = typer.Option(None, help="Train on the first N images only."),
    seed: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    precision: Optional[str] = typer.Option(None, help="bf16 | fp32"),
) -> None:
    """Train a classifier (standard, or adversarially robust with --kind robust)."""
    def check() -> TrainParams:
        if kind not in TRAIN_KINDS:
            raise RobustDataError(f"unknown --kind {kind!r}; valid: {sorted(TRAIN_KINDS)}")
        section = TRAIN_KINDS[kind]
        config = getattr(load_params(params, **{section: {
            "data": data, "out": out, "arch": arch, "epochs": epochs, "lr": lr, "batch_size": batch_size,
            "limit": limit, "seed": seed, "device": device, "precision": precision}}), section)
        require_splits(config.data, "train", "val")
        return config

    def command(checked: TrainParams) -> None:
        from robustdata.flows.train import train_flow

        result = train_flow(checked)
        console.print(f"wrote {result['out']}: val accuracy {100 * result['val_accuracy']:.2f}% after "
                      f"{result['epochs_run']} epochs in {result['train_seconds']:.1f} s of training")

    run_checked(check, command)


@app.command()
def evaluate(
    model: Optional[list[Path]] = typer.Option(None, help="Model directories (repeatable); default from params."),
    params: Optional[Path] = typer.Option(None, help="params.yaml to read the `evaluate` section from."),
    data: Optional[Path] = typer.Option(None, help="The test split directory."),
    limit: Optional[int] = typer.Option(None, help="Images attacked per model."),
    out: Optional[Path] = typer.Option(None, help="Report directory."),
    device: Optional[str] = typer.Option(None),
) -> None:
    """Clean and robust accuracy (PGD with restarts) of trained models; JSON + markdown reports."""
    def check() -> EvaluateParams:
        config = load_params(params, evaluate={"models": model or None, "data": data, "limit": limit,
                                               "out": out, "device": device}).evaluate
        require_models(*config.models)
        require_datasets(config.data)
        return config

    def command(checked: EvaluateParams) -> None:
        from robustdata.flows.train import evaluate_flow

        result = evaluate_flow(checked)
        console.print(Path(result["out"], "summary.md").read_text(), soft_wrap=True, markup=False)

    run_checked(check, command)


def class_list(text: str) -> int | list[int]:
    """'3' -> 3, '1,2' -> [1, 2]: one class or several."""
    try:
        classes = [int(part) for part in text.split(",")]
    except ValueError as exc:
        raise RobustDataError(f"classes are integers separated by commas, got {text!r}") from exc
    return classes[0] if len(classes) == 1 else classes


def trigger_settings(pairs: list[str]) -> dict[str, Any]:
    """['size=2', 'position=random'] -> {'size': 2, 'position': 'random'} (values read as YAML scalars)."""
    import yaml

    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RobustDataError(f"--set takes KEY=VALUE (an attack setting), got {pair!r}")
        settings[key] = yaml.safe_load(value)
    return settings


def print_attacks() -> None:
    """Every backdoor attack: what it is, its reference, its settings and their defaults."""
    import dataclasses

    from robustdata.poison import REGISTRY

    for name, cls in sorted(REGISTRY.all().items()):
        summary = " ".join((sys.modules[cls.__module__].__doc__ or "").split("\n\n")[0].split())
        kind = "clean-label" if cls.clean_label else "dirty-label"
        covers = f", {cls.cover_ratio:g} cover sample(s) per poison" if cls.cover_ratio else ""
        console.print(f"[bold]{name}[/bold] ({kind}{covers}): {summary}", highlight=False)
        settings = "  ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls) if f.init and f.repr)
        console.print(f"    --set {settings}\n", highlight=False, markup=False)


@app.command()
def poison(
    params: Optional[Path] = typer.Option(None, help="params.yaml to read the `poison` section from."),
    data: Optional[Path] = typer.Option(None, help="Clean ingest output with train/, val/, test/."),
    out: Optional[Path] = typer.Option(None, help="Output: train/ (poisoned), val/, test_triggered/."),
    attack: Optional[str] = typer.Option(None, help="The backdoor attack (--list shows them)."),
    setting: list[str] = typer.Option([], "--set", help="An attack setting KEY=VALUE (repeatable), e.g. size=2."),
    targeting: Optional[str] = typer.Option(None, help="all_to_one | source_specific | multi_target | all_to_all"),
    target: Optional[str] = typer.Option(None, help="Target class (multi_target: a comma list, e.g. 0,1)."),
    source: Optional[str] = typer.Option(None, help="source_specific: the source class(es), e.g. 7 or 7,8."),
    rate: Optional[float] = typer.Option(None, help="Dirty-label: fraction of the training set poisoned; "
                                                     "clean-label: fraction of the target class."),
    count: Optional[int] = typer.Option(None, help="Exact number of poisons (instead of --rate)."),
    cover_ratio: Optional[float] = typer.Option(None, help="Cover samples per poison (default: the attack's own)."),
    seed: Optional[int] = typer.Option(None),
    list_attacks: bool = typer.Option(False, "--list", help="List the attacks and their settings, and exit."),
) -> None:
    """Plant backdoor poisons with ground truth (for testing the audit, or as canaries)."""
    if list_attacks:
        run_guarded(print_attacks, runs_flows=False)
        return

    def check() -> PoisonParams:
        from pydantic import ValidationError

        section = load_params(params).poison.model_dump()
        if attack is not None and attack != section["attack"]:
            section.update(attack=attack, trigger={})  # another attack's settings do not carry over
        section["trigger"].update(trigger_settings(setting))
        section.update({k: v for k, v in {"data": data, "out": out, "targeting": targeting, "seed": seed,
                                          "cover_ratio": cover_ratio}.items() if v is not None})
        section.update({k: class_list(v) for k, v in {"target": target, "source": source}.items() if v is not None})
        if count is not None:
            section.update(count=count, rate=None)
        elif rate is not None:
            section.update(rate=rate, count=None)
        try:
            poison_params = PoisonParams.model_validate(section)
        except ValidationError as exc:
            raise RobustDataError(f"invalid poison options: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from exc
        require_splits(poison_params.data, "train", "val", "test")
        from robustdata.poison import backdoor  # the attack's settings, before any flow (this imports torch)

        backdoor(poison_params.attack, poison_params.trigger)
        return poison_params

    def command(checked: PoisonParams) -> None:
        from robustdata.flows.audit import poison_flow

        result = poison_flow(checked)
        console.print(f"wrote {result['out']}: {result['poisons']} of {result['train_samples']} training images "
                      f"poisoned with {result['attack']} ({result['targeting']}, targets {result['targets']}), "
                      f"{result['covers']} cover samples; {result['triggered_test_samples']} triggered test images")

    run_checked(check, command)


DASK_HELP = ("Run the mapped work on Dask: 'local' (a LocalCluster of --workers processes) or a scheduler "
             "address (tcp://host:8786).")


@app.command()
def audit(
    params: Optional[Path] = typer.Option(None, help="params.yaml to read the `audit` section from."),
    model: Optional[Path] = typer.Option(None, help="Directory of the model trained on the audited set."),
    data: Optional[Path] = typer.Option(None, help="Dataset with train/ (audited) and val/."),
    layer: Optional[str] = typer.Option(None, help="penultimate | last_conv | a module name"),
    eps: Optional[float] = typer.Option(None, help="Bound on a class's poisoned fraction: remove 1.5 eps of every "
                                        "class. Default: estimate which classes are poisoned and how many poisons."),
    removal_method: Optional[str] = typer.Option(None, help=" | ".join(method_names())),
    out: Optional[Path] = typer.Option(None, help="Filtered dataset output."),
    report: Optional[Path] = typer.Option(None, help="Report directory."),
    workers: Optional[int] = typer.Option(None, help="Feature-extraction chunks at once (threads, or Dask workers)."),
    dask: Optional[str] = typer.Option(None, help=DASK_HELP),
    model_spec: Optional[str] = typer.Option(None, help="Your own classifier instead of --model: "
                                             "torchscript:PATH or factory:MODULE:ATTR[?k=v] with --state-dict."),
    state_dict: Optional[Path] = typer.Option(None, help="The factory model's weights (a plain state_dict)."),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream",
                                          help="Audit shard by shard in bounded memory (default: when the set would "
                                          "fill half the RAM)."),
    sensitivity_rounds: Optional[int] = typer.Option(None, help="State the audit's sensitivity: the smallest "
                                                     "poisoned fraction of a class its canaries were all detected "
                                                     "at, over N rounds, each retraining the model's recipe once on "
                                                     "a copy with 8 canaries (robustdata models; 0: not measured)."),
    device: Optional[str] = typer.Option(None),
    fail_on_detect: bool = typer.Option(False, "--fail-on-detect",
                                        help=f"CI gate: exit {EXIT_POISONS_DETECTED} when the verdict is poisoned (or "
                                        f"any sample is flagged), {EXIT_INCONCLUSIVE} when it is inconclusive."),
    allow_inconclusive: bool = typer.Option(False, "--allow-inconclusive",
                                            help="With --fail-on-detect: pass an inconclusive verdict (exit 0)."),
) -> None:
    """Audit a training set for backdoor poisons (spectral filtering); write scores, report, filtered set."""
    def check() -> AuditParams:
        config = load_params(params, audit={"model": model, "data": data, "layer": layer, "eps": eps,
                                            "removal_method": removal_method, "out": out, "report": report,
                                            "workers": workers, "dask": dask, "device": device,
                                            "stream": stream, "model_spec": model_spec,
                                            "state_dict": state_dict, "sensitivity_rounds": sensitivity_rounds}).audit
        if config.model_spec is None:
            require_models(config.model)
        else:
            require_files(*([config.state_dict] if config.state_dict is not None else []),
                          *([Path(config.model_spec.split(":", 1)[1])] if config.model_spec.startswith("torchscript:")
                            else []))
        require_splits(config.data, "train", "val")
        return config

    def command(checked: AuditParams) -> dict[str, Any]:
        from robustdata.flows.audit import audit_flow

        result = audit_flow(checked)
        print_audit(result)
        return result

    result = run_checked(check, command)
    if fail_on_detect:
        gate(result["verdict"], result["num_flagged"], allow_inconclusive)


def gate(verdict: str, flagged: int, allow_inconclusive: bool) -> None:
    """--fail-on-detect: exit with the verdict's code (a poisoned set never passes; an inconclusive one only
    when allowed)."""
    if verdict == "poisoned" or flagged:
        err_console.print(f"[bold red]poisons detected:[/] verdict {verdict}, {flagged} samples flagged "
                          "(--fail-on-detect)")
        raise typer.Exit(EXIT_POISONS_DETECTED)
    if verdict == "inconclusive" and not allow_inconclusive:
        err_console.print("[bold yellow]audit inconclusive:[/] the audit cannot rule out poisoning at its stated "
                          "sensitivity (--fail-on-detect; --allow-inconclusive passes it)")
        raise typer.Exit(EXIT_INCONCLUSIVE)


@app.command("retrain-clean")
def retrain_clean(
    params: Optional[Path] = typer.Option(None, help="params.yaml with retrain_clean and audit_eval sections."),
) -> None:
    """Retrain on the filtered set; clean accuracy and attack success rate before and after."""
    def check() -> Params:
        config = load_params(params)
        require_splits(config.retrain_clean.data, "train", "val")
        evaluation = config.audit_eval  # its models include the one this command trains
        require_models(*(m for m in evaluation.models if Path(m) != Path(config.retrain_clean.out)))
        require_datasets(evaluation.clean_test, evaluation.triggered_test, evaluation.audited_data)
        return config

    def command(config: Params) -> None:
        from robustdata.flows.audit import retrain_clean_flow

        result = retrain_clean_flow(config.retrain_clean, config.audit_eval)
        print_loop(result["rows"])
        console.print(f"wrote {result['out']}")

    run_checked(check, command)


@app.command("audit-loop")
def audit_loop(
    params: Optional[Path] = typer.Option(None, help="params.yaml (poison, train_suspect, audit, retrain_clean, "
                                          "audit_eval sections)."),
    plant: bool = typer.Option(False, "--plant", help="Plant the `poison` section's poisons first (a demo or canary)."),
) -> None:
    """The audit loop without DVC: (plant ->) train suspect -> audit -> retrain -> before/after."""
    def check() -> Params:
        config = load_params(params)
        if plant:  # the loop's first step reads a clean ingest, or the poisoned set planted earlier
            require_splits(config.poison.data, "train", "val", "test")
        else:
            require_splits(config.train_suspect.data, "train", "val")
        return config

    def command(config: Params) -> None:
        from robustdata.flows.audit import audit_loop_flow

        result = audit_loop_flow(config, plant=plant)
        print_audit(result["audit"])
        print_loop(result["loop"]["rows"])

    run_checked(check, command)


def print_audit(result: dict[str, Any]) -> None:
    table = Table(title="audit")
    for column in ("class", "n", "separation", "z", "verdict", "estimated poisons", "removed", "true poisons"):
        table.add_column(column, justify="right")
    style = {"poisoned": "[bold red]poisoned[/]", "inconclusive": "[bold yellow]inconclusive[/]", "clean": "clean"}
    for c in result["classes"]:
        statistic = "-" if c.get("statistic") is None else f"{c['statistic']:.2f}"
        z = "-" if c.get("z") is None else f"{c['z']:.1f}"
        table.add_row(c["name"], str(c["n"]), statistic, z, style[c["verdict"]], str(c["estimated_poisons"]),
                      str(c.get("flagged", 0)), "-" if c.get("poisons") is None else str(c["poisons"]))
    console.print(table)
    for c in result["classes"]:
        if c["verdict"] != "clean":
            console.print(f"class {c['name']}: {c['verdict']}: {'; '.join(c['reasons'])}", highlight=False)
    metrics = result["metrics"]
    line = (f"verdict: {style[result['verdict']]}; removed {result['num_flagged']} samples; poisoned classes: "
            f"{result['poisoned_classes'] or 'none'}; inconclusive: {result['inconclusive_classes'] or 'none'}")
    if metrics.get("tpr") is not None:
        line += f"; TPR {100 * metrics['tpr']:.2f}%, FPR {100 * metrics['fpr']:.3f}%"
    if metrics.get("sensitivity_fraction") is not None:
        line += f"; canaries detected at >= {100 * metrics['sensitivity_fraction']:g}% of a class"
    console.print(line)
    console.print(f"report {result['report']}/report.html; filtered dataset {result['out']}")


def print_loop(rows: list[dict[str, Any]]) -> None:
    table = Table(title="before / after")
    for column in ("model", "train samples", "clean accuracy", "attack success rate"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["model"], str(row["train_samples"]), f"{100 * row['clean_accuracy']:.2f}%",
                      f"{100 * row['asr']:.2f}%")
    console.print(table)


@app.command()
def build(
    kind: str = typer.Option(..., help="robust (D_R) | nonrobust (D_NR) | rand (D_rand) | det (D_det): the "
                             "params section build_<kind> is read."),
    params: Optional[Path] = typer.Option(None, help="params.yaml to read build_<kind> from."),
    data: Optional[Path] = typer.Option(None, help="Source dataset with train/ (transformed) and val/ (copied)."),
    model: Optional[Path] = typer.Option(None, help="Model directory: a robust one for D_R, standard otherwise."),
    out: Optional[Path] = typer.Option(None, help="Output directory: <out>/train, <out>/val."),
    limit: Optional[int] = typer.Option(None, help="Build from the first N training images (subset)."),
    steps: Optional[int] = typer.Option(None, help="Optimisation steps per image."),
    step_size: Optional[float] = typer.Option(None, help="L2 step size (pixel units)."),
    schedule: Optional[str] = typer.Option(None, help="constant | linear | cosine step-size decay."),
    eps: Optional[float] = typer.Option(None, help="rand/det: L2 radius of the perturbation."),
    start: Optional[str] = typer.Option(None, help="robust/nonrobust start: other (a random training image) | noise."),
    layer: Optional[str] = typer.Option(None, help="robust/nonrobust: representation matched (penultimate, ...)."),
    workers: Optional[int] = typer.Option(None, help="Shards built at once (threads, or Dask workers)."),
    dask: Optional[str] = typer.Option(None, help=DASK_HELP),
    device: Optional[str] = typer.Option(None),
    seed: Optional[int] = typer.Option(None),
) -> None:
    """Build a robustified (D_R) or non-robust-feature (D_NR, D_rand, D_det) dataset, shard by shard.

    A killed build continues where it stopped when run again with the same params."""
    def check() -> BuildParams:
        if kind not in BUILD_KINDS:
            raise RobustDataError(f"unknown --kind {kind!r}; valid: {list(BUILD_KINDS)}")
        overrides = {"data": data, "model": model, "out": out, "limit": limit, "steps": steps,
                     "step_size": step_size, "schedule": schedule, "eps": eps, "start": start, "layer": layer,
                     "workers": workers, "dask": dask, "device": device, "seed": seed}
        config = getattr(load_params(params, **{f"build_{kind}": overrides}), f"build_{kind}")
        require_splits(config.data, "train", "val")
        require_models(config.model)
        return config

    def command(checked: BuildParams) -> None:
        from robustdata.flows.robustify import run_build

        result = run_build(checked)
        counts = ", ".join(str(n) for n in result["counts_per_class"])
        console.print(f"wrote {result['out']}: {result['num_samples']} samples ({result['shards_built']} of "
                      f"{result['num_shards']} shards built now); per class {counts}")

    run_checked(check, command)


@app.command("evaluate-built")
def evaluate_built(
    kind: str = typer.Option(..., help="original (D, the same number of images) | robust | nonrobust | rand | det"),
    params: Optional[Path] = typer.Option(None, help="params.yaml (robustify_eval and build_<kind> sections)."),
) -> None:
    """Train standard classifiers on one dataset (seeds, learning-rate sweep) and evaluate them on the
    original test set: clean accuracy and robust accuracy under PGD."""
    def check() -> Params:
        if kind not in EVALUATED_KINDS:
            raise RobustDataError(f"unknown --kind {kind!r}; valid: {list(EVALUATED_KINDS)}")
        config = load_params(params)
        require_splits(dataset_for(kind, config)[0], "train", "val")
        require_datasets(config.robustify_eval.test, config.robustify_eval.val)
        return config

    def command(config: Params) -> None:
        from robustdata.flows.robustify import evaluate_built_flow

        data_dir, limit = dataset_for(kind, config)
        result = evaluate_built_flow(kind, data_dir, limit, config.robustify_eval)
        table = Table(title=f"trained on {kind}")
        attacks = list(result["runs"][0]["robust"])
        for column in ("seed", "lr", "clean", *attacks):
            table.add_column(column, justify="right")
        for run in result["runs"]:
            table.add_row(str(run["seed"]), f"{run['lr']:g}", f"{100 * run['clean_accuracy']:.2f}%",
                          *(f"{100 * run['robust'][a]:.2f}%" for a in attacks))
        console.print(table)
        console.print(f"wrote {result['out']}")

    run_checked(check, command)


@app.command("robustify-report")
def robustify_report(params: Optional[Path] = typer.Option(None, help="params.yaml")) -> None:
    """The Ilyas et al. table (mean +- std over seeds), image grids and saliency maps."""
    def check() -> Params:
        config = load_params(params)
        require_splits(config.build_robust.data, "train")  # the originals shown beside the built images
        return config

    def command(config: Params) -> None:
        from robustdata.flows.robustify import robustify_report_flow

        result = robustify_report_flow(config)
        console.print(result["markdown"], markup=False, highlight=False)
        console.print(f"report {result['report']}")

    run_checked(check, command)


@app.command()
def pipeline(
    params: Optional[Path] = typer.Option(Path("params.yaml"), help="params.yaml with every section."),
    profile: Optional[str] = typer.Option(None, help="A profile laid over the params: quick | full (profiles/*.yaml) "
                                          "or a YAML path."),
) -> None:
    """Everything in one Prefect flow: every stage of dvc.yaml, in the order `dvc repro` runs them (ingest,
    models, the audit loop, D_R / D_NR / D_rand / D_det and classifiers on them), ending with reports/index.html."""
    def check() -> Params:
        config = load_params(params, profile=profile)
        require_source(config.ingest.source)  # every later step reads what an earlier one wrote
        return config

    def command(config: Params) -> None:
        from robustdata.flows.pipeline import pipeline_flow

        result = pipeline_flow(config)
        console.print(f"results page: {result['html']} (and {result['markdown']})")

    run_checked(check, command)


@app.command()
def repro(
    targets: Optional[list[str]] = typer.Argument(None, help="Stages to bring up to date (default: all of dvc.yaml)."),
    force: bool = typer.Option(False, "--force", help="Rerun the stages even when DVC finds them up to date."),
) -> None:
    """`dvc repro` with one Prefect server shared by every stage (PREFECT_API_URL when set, else one started
    on loopback for the run), then the path of the results page. The README's main command.

    Stopped (SIGTERM, Ctrl-C), it stops `dvc repro` and its stage first, then the server."""
    def check() -> None:
        if not Path("dvc.yaml").is_file():
            raise RobustDataError(f"no dvc.yaml in {Path.cwd()}: run `robustdata repro` in the repository's root")

    def command(_: None) -> int:
        import subprocess

        from robustdata.flows.server import prefect_server

        bin_dir = Path(sys.executable).parent
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        with prefect_server() as url:
            console.print(f"Prefect API {url}")
            # a process group of its own, which stop_dvc signals as a whole: dvc, the shell, the stage
            dvc = subprocess.Popen(["dvc", "repro", *(["--force"] if force else []), *(targets or [])],
                                   env={**env, "PREFECT_API_URL": url}, start_new_session=True)
            try:
                code = dvc.wait()
            finally:
                stop_dvc(dvc)
        if code == 0 and Path("reports/index.html").exists():
            console.print(f"results page: {Path('reports/index.html').resolve()} (and reports/index.md)")
        return code

    raise typer.Exit(run_checked(check, command, runs_flows=False))


DVC_STOP_S = 20  # dvc and its stage stop within this, or are killed (a stopped command has STOP_GRACE_S in all)


def stop_dvc(dvc: Any) -> None:
    """Stop a `dvc repro` that is still running, as Ctrl-C in a terminal would: SIGINT to its process group.
    DVC ignores it while a stage runs, the stage stops (and stops what it started), then DVC fails the stage,
    releases its lock and exits. SIGKILL to the group if that takes longer than DVC_STOP_S."""
    import subprocess

    if dvc.poll() is not None:
        return
    try:
        os.killpg(dvc.pid, signal.SIGINT)
        dvc.wait(timeout=DVC_STOP_S)
    except subprocess.TimeoutExpired:
        os.killpg(dvc.pid, signal.SIGKILL)
        dvc.wait()
    except ProcessLookupError:  # it exited meanwhile
        dvc.wait()


@app.command(name="show-params")
def show_params(
    params: Optional[Path] = typer.Option(Path("params.yaml"), help="The params file."),
    profile: Optional[str] = typer.Option(None, help="A profile laid over it: full (profiles/*.yaml) or a YAML path."),
) -> None:
    """Print the merged, validated params as YAML: `robustdata show-params --profile full > p.yaml`."""
    import yaml

    def command() -> None:
        config = load_params(params, profile=profile)
        sys.stdout.write(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))

    run_guarded(command, runs_flows=False)


@app.command()
def results(params: Optional[Path] = typer.Option(None, help="params.yaml (where each stage wrote its metrics).")
            ) -> None:
    """Write the results page (reports/index.html + index.md) from the stages' JSON metrics and figures."""
    def command() -> None:
        config = load_params(params)
        from robustdata.report.results_page import results_page  # no flow: Prefect is not imported

        result = results_page(config)
        console.print(f"results page: {result['html']} (sections: {', '.join(result['sections'])})")

    run_guarded(command, runs_flows=False)


@app.command()
def serve(
    cron: str = typer.Option("0 3 * * *", help="When the audit runs (cron, in --timezone)."),
    timezone: str = typer.Option("UTC", help="IANA time zone of the cron schedule."),
    params: Path = typer.Option(Path("params.yaml"), help="params.yaml read at the start of every run."),
    profile: Optional[str] = typer.Option(None, help="Profile laid over the params at every run."),
    name: str = typer.Option("scheduled-audit", help="Deployment name."),
    plant: bool = typer.Option(True, "--plant/--no-plant", help="Plant the `poison` section's canaries first, so "
                               "every run also measures that the audit still finds known poisons."),
) -> None:
    """Register the audit as a deployment with a cron schedule on the Prefect server at PREFECT_API_URL,
    and run its scheduled (and manually triggered) runs until stopped (Ctrl-C)."""
    def command() -> None:
        load_params(params, profile=profile)  # every run reads them afresh; a bad file fails now, not at 3 a.m.
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise RobustDataError("PREFECT_API_URL is not set: start a server with `robustdata server` (or use an "
                                  "existing one) and export the URL it prints")
        from robustdata.flows.schedule import serve_audit

        console.print(f"serving deployment scheduled-audit/{name} ({cron} {timezone}) on {PREFECT_API_URL.value()}")
        serve_audit(name=name, cron=cron, timezone=timezone, params=params.resolve(), profile=profile, plant=plant)

    run_guarded(command, runs_flows=False)


@app.command()
def server(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 to reach it from other machines)."),
    port: int = typer.Option(4200),
) -> None:
    """Start a Prefect server (the UI and API that schedules need) in the foreground: this process becomes
    `prefect server start`, so that stopping it (Ctrl-C, SIGTERM) stops the server itself."""
    console.print(f"export PREFECT_API_URL=http://{host if host != '0.0.0.0' else '127.0.0.1'}:{port}/api")
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)])


@app.command()
def card(path: Path = typer.Argument(..., help="An ingest output directory or one split's directory.")) -> None:
    """Print the dataset card(s) under PATH."""
    from robustdata.data.manifest import open_dataset

    def command() -> None:
        roots = sorted(p.parent for p in path.glob("*/card.json")) or [path]
        for root in roots:
            print_card(open_dataset(root, verify=False).card)

    run_guarded(command, runs_flows=False)


@app.command()
def verify(path: Path = typer.Argument(..., help="An ingest output directory or one split's directory.")) -> None:
    """Check every shard, manifest and image against its recorded sha256."""
    from robustdata.data.memory import load_in_memory
    from robustdata.data.stream import ShardStream

    def command() -> None:
        roots = sorted(p.parent for p in path.glob("*/card.json")) or [path]
        for root in roots:
            stream = ShardStream(root)  # checks shard and manifest hashes
            if stream.dataset.card.get("image_shape"):
                load_in_memory(stream.dataset, verify=True, use_cache=False)  # every image's hash
            else:
                sum(1 for _ in stream)
            console.print(f"[green]ok[/] {root}: {len(stream)} samples")

    run_guarded(command, runs_flows=False)


def print_summary(result: dict[str, Any]) -> None:
    from robustdata.data.manifest import open_dataset

    for split in result["splits"]:
        print_card(open_dataset(split["path"], verify=False).card)
    console.print(f"wrote {result['out']}")


def print_card(card: dict[str, Any]) -> None:
    console.print(f"[bold]{card['name']}/{card['split']}[/]: {card['num_samples']} samples, "
                  f"{len(card['shards'])} shards, image (H, W, C) {card['image_shape']}")
    table = Table()
    table.add_column("class")
    table.add_column("name")
    table.add_column("count", justify="right")
    for index, (name, count) in enumerate(zip(card["classes"], card["counts_per_class"])):
        table.add_row(str(index), name, str(count))
    console.print(table)
    built = card["built_by"]
    console.print(f"source {card['inputs']['source']}  manifest sha256 {card['manifest']['sha256'][:16]}  "
                  f"robustdata {built['robustdata']} (data code {built['data_code_sha256'][:12]})", soft_wrap=True)


if __name__ == "__main__":
    run()

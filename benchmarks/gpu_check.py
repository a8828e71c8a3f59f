#!/usr/bin/env python
"""GPU readiness: every compute step of the pipeline on CUDA at a small size, twice, against the CPU.

One run, on one CUDA GPU, in a few minutes (the `small` size: under 8 minutes on an H100 with 16 CPU cores):
  1. ingest MNIST (the offline mirror, DESIGN.md section 5) into shards and read it back;
  2. on CUDA, then again on CUDA with the same seed, then on the CPU at the same size:
     plant BadNets poisons (3x3 square, all-to-one, 5%); train a standard (suspect) model on the poisoned
     set; adversarially train a robust model (PGD) on the clean set; audit the poisoned set with the
     suspect model (filter, spectral signatures, SPECTRE, activation clustering); build a batch of D_R (the
     robust model) and of D_det (the standard model); evaluate (clean accuracy, PGD robust accuracy, the
     backdoor's attack success rate);
  3. checks that the two CUDA runs agree: bit for bit for every step in which torch promised it (the
     deterministic settings below, and no op warned that it has no deterministic implementation); a step
     in which an op did warn is held to the tolerances of TOLERANCES instead, and the report says which;
  4. checks each run's invariants (outputs on the run's device, pixels in [0, 1], D_det labels y + 1,
     robust <= clean accuracy, the audit finds the planted poisons) and that CUDA and CPU outcomes agree
     within the tolerances of TOLERANCES (not bit for bit: the kernels differ);
  5. prints a table of step times (CUDA cold, CUDA warm, CPU) and writes reports/bench/gpu_check.json with
     the git commit, the exact command, the machine and every number.
The CPU reference run takes no further step once --budget-s (420 s) have passed since the start; the steps
it did not time are listed as such (a slow host CPU, e.g. one without bf16 instructions, cannot push the
check past 8 minutes).

It calls the library (robustdata.*) directly, not the flows. Without CUDA it exits (code 2) saying so;
`--device cpu` runs the same steps at the `tiny` size with the CPU as the "device" (two runs and the
reference run, all on the CPU): a smoke test of the script itself, written to gpu_check_cpu_smoke.json.

    python benchmarks/gpu_check.py                      # on a GPU machine (MNIST must be in the cache)
    python benchmarks/gpu_check.py --device cpu         # smoke run anywhere, ~2 min on 2 cores
    ROBUSTDATA_CACHE=bench-work/cache python benchmarks/gpu_check.py   # the MNIST pickle carried in

Deterministic settings (https://pytorch.org/docs/stable/notes/randomness.html): CUBLAS_WORKSPACE_CONFIG
=:4096:8 (set before CUDA starts), torch.use_deterministic_algorithms(True, warn_only=True),
cudnn.deterministic = True, cudnn.benchmark = False, TF32 off. Timings are taken under these settings.
Exit code: 0 when every check passes, 1 when one fails, 2 when the machine cannot run the check.
"""

from __future__ import annotations

import os

# cuBLAS reproducibility needs this before the CUDA context exists, so before anything touches CUDA
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Iterator  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

from provenance import provenance  # noqa: E402

from robustdata.audit.features import extract_features  # noqa: E402
from robustdata.audit.metrics import detection_metrics  # noqa: E402
from robustdata.poison import backdoor  # noqa: E402
from robustdata.poison.plant import Dose, plant, triggered_test_set  # noqa: E402
from robustdata.poison.targeting import Targeting  # noqa: E402
from robustdata.audit.scoring import run_audit  # noqa: E402
from robustdata.config import AttackParams, Params  # noqa: E402
from robustdata.data.ingest import ingest_split  # noqa: E402
from robustdata.data.memory import InMemoryDataset, load_in_memory  # noqa: E402
from robustdata.data.sources import MnistMirror, default_cache_dir  # noqa: E402
from robustdata.errors import RobustDataError  # noqa: E402
from robustdata.io import write_json_atomic  # noqa: E402
from robustdata.robustify.builders import StepConfig, build_batch  # noqa: E402
from robustdata.train.training import evaluate_model, fit, generator_for, predict  # noqa: E402


@dataclass(frozen=True)
class Size:
    train: int          # training images (poisoned set and the robust model's set)
    val: int
    test: int
    epochs: int         # standard (suspect) model
    robust_limit: int   # adversarial training: the first N training images ...
    robust_epochs: int  # ... for this many epochs
    guard: int          # val images of the overfitting guard (PGD-10 after the epoch)
    build: int          # images per built batch (D_R and D_det)
    build_steps: int    # D_R inversion steps (D_det: half as many)
    attacked: int       # test images attacked when evaluating
    attack_steps: int   # PGD steps of that evaluation


SIZES = {
    # 20k images x 3 epochs (train_suspect's epochs): the audit then finds the poisons (TPR 1.0, FPR 5e-5 on
    # the CPU; with 10k x 2 the model is too weak and it finds 13%)
    "small": Size(train=20000, val=1000, test=2000, epochs=3, robust_limit=10000, robust_epochs=2, guard=200,
                  build=1000, build_steps=100, attacked=500, attack_steps=20),
    "tiny": Size(train=1200, val=200, test=300, epochs=3, robust_limit=400, robust_epochs=1, guard=50, build=64,
                 build_steps=10, attacked=64, attack_steps=5),
}
SEED = 0
POISON, TARGETING, DOSE = backdoor("badnets"), Targeting("all_to_one", (0,)), Dose(rate=0.05)

# Where bit-identity is not promised (an op warned), and between CUDA and the CPU: the outcomes must agree
# this closely. Accuracies in fractions of the test images; audit flags as Jaccard overlap of the flagged sets.
TOLERANCES = {
    "accuracy_abs": 0.03,       # clean / robust accuracy, attack success rate
    "flag_jaccard_min": 0.9,    # the filter's flagged set
    "detection_tpr_abs": 0.05,  # the filter's true-positive rate on the planted poisons
    "build_distance_abs": 0.05,  # D_R median relative feature distance
    "build_hit_rate_abs": 0.05,  # D_det: fraction classified as the new label
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- machine and settings


def deterministic_settings() -> dict[str, Any]:
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return {"CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "use_deterministic_algorithms": "True (warn_only)", "cudnn.deterministic": True,
            "cudnn.benchmark": False, "tf32": False}


# --------------------------------------------------------------------------- timing


class DeadlineReached(Exception):
    """The CPU reference run is stopped before a step once the script's time budget is spent."""


class Timer:
    """Wall time of each step, the device synchronised before and after (CUDA runs asynchronously), and
    the determinism warnings torch raised inside it. With a deadline (perf_counter seconds), a step that
    would start after it raises DeadlineReached instead."""

    def __init__(self, device: torch.device, deadline: float | None = None):
        self.device, self.deadline, self.seconds, self.nondeterministic = device, deadline, {}, {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        if self.deadline is not None and time.perf_counter() > self.deadline:
            raise DeadlineReached(name)
        self.sync()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            yield
            self.sync()
            self.seconds[name] = time.perf_counter() - start
        ops = sorted({str(w.message).split(" does not have a deterministic")[0] for w in caught
                      if "deterministic" in str(w.message)})
        self.nondeterministic[name] = ops
        for w in caught:  # everything else is shown as usual
            if "deterministic" not in str(w.message):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


# --------------------------------------------------------------------------- the steps


def ingest(cache_dir: Path, size: Size, work: Path) -> dict[str, InMemoryDataset]:
    source = MnistMirror(cache_dir=cache_dir, download=False)
    data = {}
    for split, n in (("train", size.train), ("val", size.val), ("test", size.test)):
        ingest_split(source, split, work / split, shard_size=5000, limit=n, progress=False)
        data[split] = load_in_memory(work / split, progress=False, use_cache=False)
    return data


def step_config(params, steps: int) -> StepConfig:
    """The pipeline's recipe for a builder (params.yaml's build_* section), with fewer steps."""
    return StepConfig(steps, params.step_size, params.schedule, math.inf if params.eps is None else params.eps,
                      params.precision, params.relu_grad_beta, params.pool_grad)


def pipeline(data: dict[str, InMemoryDataset], device: torch.device, size: Size, timer: Timer
             ) -> tuple[dict, dict, Timer]:
    """Every compute step once on `device`, with the pipeline's own recipes (params.yaml) scaled down.
    Returns (outputs to compare between runs, outcome numbers, timer)."""
    defaults = Params()
    train, val, test = data["train"], data["val"], data["test"]
    out: dict[str, Any] = {}
    outcome: dict[str, Any] = {}
    dev = str(device)

    with timer.step("poison"):
        planted = plant(train.images.to(device), train.labels.to(device), POISON, TARGETING, DOSE,
                        len(train.classes), torch.Generator().manual_seed(SEED))
        images, labels, is_poison = planted.images, planted.labels, planted.is_poison
        poisoned = InMemoryDataset(images, labels, train.keys, train.classes)
        triggered, target_labels, _ = triggered_test_set(test.images.to(device), test.labels.to(device), POISON,
                                                         TARGETING, len(test.classes), torch.Generator())
    out["poison"] = {"images": images, "labels": labels, "is_poison": is_poison}

    with timer.step("train standard"):
        suspect_params = defaults.train_suspect.model_copy(update={"epochs": size.epochs, "device": dev,
                                                                   "seed": SEED})
        suspect, info = fit(poisoned, val, suspect_params, progress=False)
    out["train standard"] = {"weights": suspect.state_dict(), "history": info["history"]}
    outcome["standard val accuracy"] = info["val"]["accuracy"]

    with timer.step("train adversarial"):
        robust_defaults = defaults.train_robust
        adversarial = robust_defaults.adversarial.model_copy(update={"guard_size": size.guard})
        robust_params = robust_defaults.model_copy(update={"epochs": size.robust_epochs, "limit": size.robust_limit,
                                                           "device": dev,
                                                           "seed": SEED, "adversarial": adversarial})
        robust, info = fit(train, val, robust_params, progress=False)
    out["train adversarial"] = {"weights": robust.state_dict(), "history": info["history"]}
    outcome["robust val accuracy"] = info["val"]["accuracy"]

    with timer.step("audit"):
        audit = defaults.audit
        features = extract_features(suspect, images, audit.layer, batch_size=audit.batch_size)
        inputs = images.flatten(1).float().div(255.0)
        methods = tuple(dict.fromkeys([*audit.methods, "spectre"]))  # SPECTRE too: matrix_exp on the device
        result = run_audit(features, inputs, labels, len(train.classes), eps=audit.eps, methods=methods,
                           removal_method=audit.removal_method, rank=audit.rank, filter_rank=audit.filter_rank,
                           spectral_k=audit.spectral_k, kappa=audit.kappa, eps_scope=audit.eps_scope,
                           generator=generator_for(audit.seed, device))
    out["audit"] = {"features": features, "scores": result.scores, "flagged": result.flagged}
    removed = result.removed
    detection = detection_metrics(result.scores[result.removal_method], removed, is_poison, labels,
                                  len(train.classes))["overall"]
    outcome.update({"audit tpr": detection["tpr"], "audit fpr": detection["fpr"], "audit auroc": detection["auroc"],
                    "audit flagged": removed.cpu()})

    index = torch.arange(size.build)
    with timer.step("build D_R"):
        built_r = build_batch("robust", robust, index, train.images, train.labels, len(train.classes),
                              defaults.build_robust.layer, step_config(defaults.build_robust, size.build_steps),
                              generator_for(SEED, device))
    out["build D_R"] = asdict(built_r)
    outcome["D_R median distance"] = float(built_r.final_distance.median())

    with timer.step("build D_det"):
        built_det = build_batch("det", suspect, index, train.images, train.labels, len(train.classes),
                                defaults.build_det.layer,
                                step_config(defaults.build_det, max(1, size.build_steps // 2)),
                                generator_for(SEED, device))
    out["build D_det"] = asdict(built_det)
    outcome["D_det hit rate"] = float((predict(suspect, built_det.images) == built_det.labels.cpu()).float().mean())

    with timer.step("evaluate"):
        attack = AttackParams(threat="linf", eps=0.3, steps=size.attack_steps, step_size=2.5 * 0.3 / size.attack_steps,
                              restarts=1)
        report = evaluate_model(robust, test, [attack], limit=size.attacked, seed=SEED)
        asr = float((predict(suspect, triggered) == target_labels.cpu()).float().mean())
    out["evaluate"] = {"report": {k: v for k, v in report["robust"][0].items() if k != "seconds"},
                       "clean": report["clean"], "asr": asr}
    outcome.update({"robust clean accuracy": report["clean"]["accuracy"],
                    "robust PGD accuracy": report["robust"][0]["accuracy"],
                    "robust clean accuracy (attacked images)": report["robust"][0]["clean_accuracy_same_images"],
                    "backdoor ASR (suspect)": asr})
    outcome["invariants"] = invariants(out, built_r, built_det, train, index, is_poison, device)
    return out, outcome, timer


def invariants(out, built_r, built_det, train, index, is_poison, device) -> dict[str, bool]:
    evaluate = out["evaluate"]["report"]
    return {
        "built images on the run's device": built_r.images.device.type == device.type == built_det.images.device.type,
        "built pixels in [0, 1]": bool(min(built_r.images.min(), built_det.images.min()) >= 0
                                       and max(built_r.images.max(), built_det.images.max()) <= 1),
        "D_R keeps labels y": bool(torch.equal(built_r.labels.cpu(), train.labels[index])),
        "D_det labels are y + 1": bool(torch.equal(built_det.labels.cpu(), (train.labels[index] + 1) % 10)),
        "robust accuracy <= clean accuracy": evaluate["accuracy"] <= evaluate["clean_accuracy_same_images"],
        "poisons planted": int(is_poison.sum()) == round(DOSE.rate * len(train)),
        "audit scores on the run's device": all(
            t.device.type == device.type for t in (*out["audit"]["scores"].values(), *out["audit"]["flagged"].values())),
    }


# --------------------------------------------------------------------------- comparing runs


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in flatten(value, f"{prefix}{key}/").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, value in enumerate(obj) for k, v in flatten(value, f"{prefix}{i}/").items()}
    return {prefix.rstrip("/"): obj}


def difference(a: Any, b: Any) -> tuple[bool, float]:
    """(bit-identical, largest absolute difference) of two step outputs."""
    flat_a, flat_b = flatten(a), flatten(b)
    if flat_a.keys() != flat_b.keys():
        return False, math.inf
    identical, largest = True, 0.0
    for key, x in flat_a.items():
        y = flat_b[key]
        if isinstance(x, torch.Tensor):
            x, y = x.detach().cpu(), y.detach().cpu()
            if x.shape != y.shape or x.dtype != y.dtype:
                return False, math.inf
            if not torch.equal(x, y):
                identical = False
                if x.numel():
                    largest = max(largest, float((x.double() - y.double()).abs().nan_to_num(math.inf).max()))
        elif x != y:
            identical = False
            if isinstance(x, (int, float)) and isinstance(y, (int, float)):
                largest = max(largest, abs(float(x) - float(y)))
            else:
                largest = math.inf
    return identical, largest


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def outcome_agreement(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each outcome of two runs side by side, and whether they agree within TOLERANCES."""
    rows = {}
    for key in ("standard val accuracy", "robust val accuracy", "robust clean accuracy", "robust PGD accuracy",
                "backdoor ASR (suspect)"):
        rows[key] = {"a": a[key], "b": b[key], "ok": abs(a[key] - b[key]) <= TOLERANCES["accuracy_abs"]}
    rows["audit tpr"] = {"a": a["audit tpr"], "b": b["audit tpr"],
                         "ok": abs((a["audit tpr"] or 0) - (b["audit tpr"] or 0)) <= TOLERANCES["detection_tpr_abs"]}
    overlap = jaccard(a["audit flagged"], b["audit flagged"])
    rows["audit flagged (Jaccard)"] = {"a": int(a["audit flagged"].sum()), "b": int(b["audit flagged"].sum()),
                                       "jaccard": overlap, "ok": overlap >= TOLERANCES["flag_jaccard_min"]}
    rows["D_R median distance"] = {"a": a["D_R median distance"], "b": b["D_R median distance"],
                                   "ok": abs(a["D_R median distance"] - b["D_R median distance"])
                                   <= TOLERANCES["build_distance_abs"]}
    rows["D_det hit rate"] = {"a": a["D_det hit rate"], "b": b["D_det hit rate"],
                              "ok": abs(a["D_det hit rate"] - b["D_det hit rate"]) <= TOLERANCES["build_hit_rate_abs"]}
    return rows


def determinism(first: tuple, second: tuple) -> dict[str, dict[str, Any]]:
    """Per step: bit-identical? promised? (no op warned in either run) and the verdict."""
    (out_a, outcome_a, timer_a), (out_b, outcome_b, timer_b) = first, second
    agreement = outcome_agreement(outcome_a, outcome_b)
    tolerance_rows = {"poison": [], "train standard": ["standard val accuracy"],
                      "train adversarial": ["robust val accuracy"],
                      "audit": ["audit tpr", "audit flagged (Jaccard)"], "build D_R": ["D_R median distance"],
                      "build D_det": ["D_det hit rate"],
                      "evaluate": ["robust clean accuracy", "robust PGD accuracy", "backdoor ASR (suspect)"]}
    steps = {}
    for step, rows in tolerance_rows.items():
        identical, largest = difference(out_a[step], out_b[step])
        warned = sorted(set(timer_a.nondeterministic[step]) | set(timer_b.nondeterministic[step]))
        within = all(agreement[row]["ok"] for row in rows)
        if identical:
            verdict, ok = "bit-identical", True
        elif warned:
            verdict, ok = f"within tolerance ({', '.join(rows) or 'no outcome'})" if within else "OUT OF TOLERANCE", within
        else:
            verdict, ok = "DIFFERS although torch promised bit-identity", False
        steps[step] = {"bit_identical": identical, "max_abs_diff": largest, "nondeterministic_ops": warned,
                       "promised_bitwise": not warned, "verdict": verdict, "ok": ok}
    return steps


# --------------------------------------------------------------------------- report


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def jsonable(outcome: dict[str, Any]) -> dict[str, Any]:
    return {k: (int(v.sum()) if isinstance(v, torch.Tensor) else v) for k, v in outcome.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (cpu: a smoke run of the script)")
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="default: small on CUDA, tiny on CPU")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where mnist.pkl.gz is "
                        "(default $ROBUSTDATA_CACHE or ~/.cache/robustdata)")
    parser.add_argument("--skip-cpu", action="store_true", help="no CPU reference run")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="seconds from the start after which the CPU reference run takes no further step")
    parser.add_argument("--out", type=Path, default=None,
                        help="default reports/bench/gpu_check.json (CUDA), reports/bench/gpu_check_cpu_smoke.json")
    args = parser.parse_args()
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        log(f"gpu_check: bad --device {args.device!r} ({exc}); use cuda, cuda:N or cpu")
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        log(f"gpu_check: no CUDA GPU here: torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda}). Run it on a machine with a GPU, or "
            "`python benchmarks/gpu_check.py --device cpu` for a tiny smoke run of the same steps on the CPU.")
        return 2
    if device.type not in ("cuda", "cpu"):
        log(f"gpu_check: --device {args.device!r}: only cuda and cpu are checked")
        return 2
    smoke = device.type == "cpu"
    size_name = args.size or ("tiny" if smoke else "small")
    size = SIZES[size_name]
    out_path = args.out or REPO / "reports" / "bench" / ("gpu_check_cpu_smoke.json" if smoke else "gpu_check.json")
    cache_dir = args.cache_dir or default_cache_dir()
    settings = deterministic_settings()
    started = time.perf_counter()
    log(f"gpu_check on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'no GPU'}), size {size_name}")

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        ingest_start = time.perf_counter()
        try:
            data = ingest(cache_dir, size, Path(work))
        except RobustDataError as exc:
            log(f"gpu_check: cannot read MNIST ({exc}). Put mnist.pkl.gz (DESIGN.md section 5) in {cache_dir}, "
                "or point --cache-dir / ROBUSTDATA_CACHE at a folder holding it.")
            return 2
        ingest_seconds = time.perf_counter() - ingest_start
        log(f"ingest: {ingest_seconds:.1f} s")
        runs, cpu_timer, cpu_stopped_before = {}, None, None
        for name, run_device in (("device run 1", device), ("device run 2", device)):
            log(f"{name} on {run_device} ...")
            runs[name] = pipeline(data, run_device, size, Timer(run_device))
        if not args.skip_cpu:
            log("CPU reference run ...")
            cpu_timer = Timer(torch.device("cpu"), deadline=started + args.budget_s)
            try:
                runs["cpu"] = pipeline(data, torch.device("cpu"), size, cpu_timer)
            except DeadlineReached as exc:
                cpu_stopped_before = str(exc)
                log(f"CPU reference run stopped before {cpu_stopped_before!r}: the {args.budget_s:.0f} s budget is spent")

    steps = determinism(runs["device run 1"], runs["device run 2"])
    versus_cpu = outcome_agreement(runs["device run 2"][1], runs["cpu"][1]) if "cpu" in runs else None
    invariant_checks = {name: run[1]["invariants"] for name, run in runs.items()}
    checks = {
        "two same-seed runs agree": all(s["ok"] for s in steps.values()),
        "invariants hold in every run": all(all(v.values()) for v in invariant_checks.values()),
        f"{device.type} and CPU outcomes agree within tolerance": (all(r["ok"] for r in versus_cpu.values())
                                                         if versus_cpu is not None else None),
        # at the tiny size the suspect model is too weak for the audit to be judged
        "the audit finds the planted poisons (TPR >= 0.9, FPR <= 0.01)": None if size_name == "tiny" else all(
            (run[1]["audit tpr"] or 0) >= 0.9 and (run[1]["audit fpr"] or 0) <= 0.01 for run in runs.values()),
    }
    passed = all(v for v in checks.values() if v is not None)
    total = time.perf_counter() - started

    seconds = {name: run[2].seconds for name, run in runs.items()}
    if cpu_timer is not None and "cpu" not in seconds:
        seconds["cpu"] = cpu_timer.seconds  # the steps it finished before the budget ran out
    rows = [["ingest (host)", f"{ingest_seconds:.2f}", "", "", ""]]
    for step in steps:
        cold, warm = seconds["device run 1"][step], seconds["device run 2"][step]
        cpu = seconds.get("cpu", {}).get(step)
        untimed = "(budget spent)" if cpu_stopped_before else ""
        rows.append([step, f"{cold:.2f}", f"{warm:.2f}", untimed if cpu is None else f"{cpu:.2f}",
                     "" if cpu is None else f"{cpu / warm:.1f}x"])
    print(f"\nstep times in seconds ({device}, size {size_name}: {asdict(size)})")
    print(table(rows, ["step", f"{device.type} run 1 (cold)", f"{device.type} run 2", "cpu", "cpu / run 2"]))
    print("\ntwo same-seed runs")
    print(table([[s, v["verdict"], f"{v['max_abs_diff']:.3g}", ", ".join(v["nondeterministic_ops"]) or "-"]
                 for s, v in steps.items()], ["step", "verdict", "max |diff|", "ops without a deterministic kernel"]))
    outcome_rows = []
    for key, row in outcome_agreement(runs["device run 1"][1], runs["device run 2"][1]).items():
        cpu_row = versus_cpu[key] if versus_cpu else None
        fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
        outcome_rows.append([key, fmt(row["a"]), fmt(row["b"]), fmt(cpu_row["b"]) if cpu_row else "",
                             ("ok" if cpu_row["ok"] else "DIFFERS") if cpu_row else ""])
    print("\noutcomes")
    print(table(outcome_rows, ["outcome", "run 1", "run 2", "cpu", f"{device.type} vs cpu"]))
    print("\nchecks")
    for name, value in checks.items():
        print(f"  {'-' if value is None else ('PASS' if value else 'FAIL')}  {name}")
    for name, values in invariant_checks.items():
        failed = [k for k, v in values.items() if not v]
        if failed:
            print(f"  FAIL  {name}: {failed}")
    print(f"\ntotal {total:.0f} s; {'all checks pass' if passed else 'SOME CHECKS FAIL'}")

    write_json_atomic(out_path, {
        **provenance("gpu_check"), "device": str(device), "smoke": smoke,
        "size": {"name": size_name, **asdict(size)},
        "deterministic_settings": settings, "tolerances": TOLERANCES,
        "seconds": {"ingest_host": ingest_seconds, **seconds, "total": total},
        "determinism": steps,
        "outcomes": {name: jsonable({k: v for k, v in run[1].items() if k != "invariants"})
                     for name, run in runs.items()},
        "cuda_vs_cpu": versus_cpu, "cpu_run_stopped_before": cpu_stopped_before, "budget_s": args.budget_s,
        "invariants": invariant_checks, "checks": checks, "passed": passed,
    })
    log(f"wrote {out_path}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

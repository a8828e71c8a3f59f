"""Standard and adversarial training on in-memory data, evaluation, checkpoints.

Randomness comes from explicit streams: `init_seed` for the weights and a
torch.Generator for data order (and one for attacks), so two runs with the same
seeds give identical weights on CPU, and a filtered and an unfiltered run stay
paired.

A run given a `Resume` saves everything it depends on after every epoch (weights,
optimizer, schedule, each random stream, the overfitting guard), so a killed run,
rerun, continues from its last epoch and ends with the same weights.
"""

from __future__ import annotations

import copy
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robustdata.train.attacks import PGDConfig, evaluating, fgsm_rs, pgd_attack, threat_model
from robustdata.config import AdversarialParams, AttackParams, TrainParams
from robustdata.data.memory import InMemoryDataset
from robustdata.errors import DataError, IntegrityError
from robustdata.io import dumps_json, read_json, sha256_bytes, write_bytes_atomic, write_json_atomic
from robustdata.train.models import autocast, build_model
from robustdata.progress import progress_bar

# adversary(model, x, y) -> x_adv, called in train mode
Adversary = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


ADVERSARIAL_METHODS = ("fgsm_rs", "pgd")


def make_adversary(config: AdversarialParams, generator: torch.Generator) -> Adversary:
    if config.method == "fgsm_rs":
        return lambda model, x, y: fgsm_rs(model, x, y, config.eps, config.alpha, generator)
    if config.method == "pgd":
        attack = PGDConfig(threat_model(config.threat, config.eps), config.steps, config.step_size)
        return lambda model, x, y: pgd_attack(model, x, y, attack, generator=generator)
    raise DataError(f"unknown adversarial training method {config.method!r}; valid: {list(ADVERSARIAL_METHODS)}")


class OverfitGuard:
    """After each epoch, PGD accuracy on held-out images; keeps the best weights and
    stops training when accuracy collapses (FGSM's catastrophic overfitting, Wong et al. 2020)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, attack: PGDConfig, generator: torch.Generator,
                 max_drop: float):
        self.images, self.labels, self.attack, self.generator = images, labels, attack, generator
        self.max_drop = max_drop
        self.best_accuracy, self.best_state, self.history = -1.0, None, []

    def __call__(self, epoch: int, model: nn.Module) -> bool:
        predictions = adversarial_predict(model, self.images, self.labels, self.attack, self.generator)
        accuracy = (predictions == self.labels.cpu()).float().mean().item()
        self.history.append(accuracy)
        if accuracy > self.best_accuracy:
            self.best_accuracy, self.best_state = accuracy, copy.deepcopy(model.state_dict())
        return accuracy < self.best_accuracy - self.max_drop

    def restore_best(self, model: nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    def state_dict(self) -> dict[str, Any]:
        """Tensors only, so a resume state loads with weights_only=True."""
        state = {"best_accuracy": torch.tensor(self.best_accuracy, dtype=torch.float64),
                 "history": torch.tensor(self.history, dtype=torch.float64),
                 "generator": self.generator.get_state()}
        if self.best_state is not None:
            state["best_state"] = self.best_state
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_accuracy = state["best_accuracy"].item()
        self.history = state["history"].tolist()
        self.generator.set_state(state["generator"])
        self.best_state = state.get("best_state")  # restore_best copies it onto the model's device


def seeded_model(arch: str, num_classes: int, in_channels: int, image_size: int, init_seed: int,
                 device: torch.device | str = "cpu") -> nn.Module:
    """Weights drawn from their own seed, without touching the global RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = build_model(arch, num_classes, in_channels, image_size)
    return model.to(device)


def triangular(step: int, total: int, warmup_fraction: float) -> float:
    """Learning-rate multiplier: linear up to 1 at warmup, linear down to 0 at the end."""
    peak = max(1, int(total * warmup_fraction))
    return step / peak if step < peak else max(0.0, (total - step) / max(1, total - peak))


@dataclass
class Resume:
    """Save a run's state to `path` after every epoch, and continue from it when it is there.

    `fingerprint` (JSON) says what is trained: a state saved under another one is
    ignored, never resumed. `stateful` names what else the run depends on besides the
    weights, optimizer, schedule and data order (the attack's random stream, the
    overfitting guard): torch.Generators or objects with state_dict/load_state_dict.
    """

    path: Path
    fingerprint: dict[str, Any]
    stateful: dict[str, Any] = field(default_factory=dict)


def optimizer_for(model: nn.Module, config: TrainParams, total_steps: int
                  ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer (no weight decay on biases and norms) and its triangular learning-rate schedule."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    elif config.optimizer == "adam":
        optimizer = torch.optim.AdamW(groups, lr=config.lr)
    else:
        raise DataError(f"unknown optimizer {config.optimizer!r}; valid: ['adam', 'sgd']")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: triangular(s, total_steps, config.warmup_fraction))
    return optimizer, scheduler


def train_epoch(model: nn.Module, data: InMemoryDataset, config: TrainParams, generator: torch.Generator,
                optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                adversary: Adversary | None, epoch: int, progress: bool) -> dict[str, float]:
    """One pass over `data` (on the model's device) in the order `generator` draws; its loss and accuracy."""
    device = next(model.parameters()).device
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    # summed on the device (float64, as Python floats would be): no host sync per step
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    batches = progress_bar(data.batches(config.batch_size, generator=generator), total=steps_per_epoch,
                           desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
    for x, y in batches:
        x = x.contiguous(memory_format=memory_format)
        with autocast(device, config.precision):
            if adversary is not None:
                x = adversary(model, x, y)
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach().double() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    loss_sum, correct = loss_sum.item(), correct.item()
    if not math.isfinite(loss_sum):
        raise DataError(f"training diverged in epoch {epoch + 1} (loss is {loss_sum}); lower the learning rate")
    return {"epoch": epoch + 1, "loss": loss_sum / seen, "train_accuracy": correct / seen}


def train_model(model: nn.Module, data: InMemoryDataset, config: TrainParams, generator: torch.Generator,
                adversary: Adversary | None = None, progress: bool = True,
                on_epoch: Callable[[int, nn.Module], bool] | None = None,
                resume: Resume | None = None) -> list[dict[str, float]]:
    """Train in place; return per-epoch loss/accuracy on the (possibly adversarial) batches.

    on_epoch(epoch, model) may return True to stop early (e.g. catastrophic overfitting).
    With `resume`, the state is saved after each epoch (after on_epoch) and a saved
    state with the same fingerprint is continued from: the result is bit-identical
    to an uninterrupted run on CPU.
    """
    data = data.to(next(model.parameters()).device)
    model.to(memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
    optimizer, scheduler = optimizer_for(model, config, math.ceil(len(data) / config.batch_size) * config.epochs)
    history, first_epoch = [], 0
    stateful = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "data_order": generator}
    if resume is not None:
        stateful.update(resume.stateful)
        saved = load_resume_state(resume.path, stateful, resume.fingerprint)
        if saved is not None:
            history, first_epoch = saved["history"], saved["next_epoch"]
    model.train()
    for epoch in range(first_epoch, config.epochs):
        history.append(train_epoch(model, data, config, generator, optimizer, scheduler, adversary, epoch, progress))
        stop = on_epoch is not None and on_epoch(epoch, model)
        if resume is not None:  # a stopped run is finished: a rerun must not train on
            save_resume_state(resume.path, stateful, {"fingerprint": resume.fingerprint, "history": history,
                                                      "next_epoch": config.epochs if stop else epoch + 1})
        if stop:
            break
    model.eval()
    return history


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted labels for uint8 (N, C, H, W) or float images."""
    device = next(model.parameters()).device
    with evaluating(model):
        out = [model(to_float(images[i:i + batch_size]).to(device)).argmax(1).cpu()
               for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(255.0) if images.dtype == torch.uint8 else images


def adversarial_predict(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: PGDConfig,
                        generator: torch.Generator, batch_size: int = 500,
                        progress: bool = False) -> torch.Tensor:
    device = next(model.parameters()).device
    out = []
    for i in progress_bar(range(0, len(images), batch_size), desc="attack", disable=not progress, leave=False):
        x = to_float(images[i:i + batch_size]).to(device)
        y = labels[i:i + batch_size].to(device)
        x_adv = pgd_attack(model, x, y, config, generator=generator)
        out.append(predict(model, x_adv).cpu())
    return torch.cat(out)


def accuracy_report(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    correct = predictions == labels
    per_class = [correct[labels == c].float().mean().item() if (labels == c).any() else None
                 for c in range(num_classes)]
    return {"accuracy": correct.float().mean().item(), "per_class": per_class, "n": len(labels)}


# --------------------------------------------------------------------------- checkpoints

MODEL_FILE = "model.pt"  # a model directory holds model.pt (the state_dict) and model.json (its sidecar)


def save_checkpoint(path: str | Path, model: nn.Module, sidecar: dict[str, Any]) -> None:
    """state_dict (torch.save) + JSON sidecar (architecture, params, data hash, metrics, and the sha256 of
    the weights file, checked by load_checkpoint), both atomic, sidecar last."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    data = buffer.getvalue()
    write_bytes_atomic(path, data)
    write_json_atomic(Path(path).with_suffix(".json"), {**sidecar, "weights_sha256": sha256_bytes(data)})


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from the sidecar and load weights with weights_only=True (never unpickles code),
    after checking them against the sha256 the sidecar recorded: weights altered after they were written
    are refused (IntegrityError, exit code 3)."""
    path = Path(path)
    sidecar = read_json(path.with_suffix(".json"))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read the weights ({exc.strerror})", path=path) from exc
    expected = sidecar.get("weights_sha256")
    if expected is None:
        raise IntegrityError(f"its sidecar {path.with_suffix('.json').name} records no weights_sha256: the "
                             "checkpoint predates integrity checks or was not written by robustdata; retrain it",
                             path=path)
    if sha256_bytes(data) != expected:
        raise IntegrityError("the weights were altered after they were written (sha256 differs from the one "
                             f"in {path.with_suffix('.json').name}); retrain, or restore them (dvc checkout)",
                             path=path)
    model = build_model(sidecar["arch"], sidecar["num_classes"], sidecar["in_channels"], sidecar["image_size"])
    try:
        state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError/RuntimeError for foreign or corrupt files
        raise DataError(f"not a loadable state_dict ({type(exc).__name__}: {exc})", path=path) from exc
    model.load_state_dict(state)
    return model.to(device).eval(), sidecar


def load_model(model_dir: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """load_checkpoint of a model directory's MODEL_FILE."""
    return load_checkpoint(Path(model_dir) / MODEL_FILE, device)


# --------------------------------------------------------------------------- resume state

RESUME_FILE = "resume.pt"


def work_dir(out: str | Path) -> Path:
    """Where a run in progress keeps its resume state: `<out>.partial`, beside its output."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def save_resume_state(path: str | Path, stateful: dict[str, Any], meta: dict[str, Any]) -> None:
    """Each object's state (Generator.get_state() or state_dict()) in one torch file, then `meta` (JSON)
    in a sidecar that records the torch file's sha256. Both atomic, sidecar last: a torch file
    without its sidecar is taken as absent, so a kill between the two writes costs an epoch, never a mix.
    """
    buffer = io.BytesIO()
    torch.save({name: obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict()
                for name, obj in stateful.items()}, buffer)
    data = buffer.getvalue()
    write_bytes_atomic(path, data)
    write_json_atomic(Path(path).with_suffix(".json"), {**meta, "sha256": sha256_bytes(data)})


def load_resume_state(path: str | Path, stateful: dict[str, Any], fingerprint: dict[str, Any]
                      ) -> dict[str, Any] | None:
    """Restore `stateful` in place from a state saved under the same fingerprint and return its meta;
    None (nothing restored) when there is none: absent, half-written, or from other params or data."""
    path = Path(path)
    try:
        meta, data = read_json(path.with_suffix(".json")), path.read_bytes()
    except (DataError, OSError):
        return None
    if (not isinstance(meta, dict) or meta.get("sha256") != sha256_bytes(data)
            or meta.get("fingerprint") != json_round_trip(fingerprint)):
        return None
    # weights_only: tensors and plain containers (the optimizer's numbers), never code
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    for name, obj in stateful.items():
        if isinstance(obj, torch.Generator):
            obj.set_state(state[name])
        else:
            obj.load_state_dict(state[name])
    return meta


def json_round_trip(obj: Any) -> Any:
    """`obj` as it reads back from JSON (tuples become lists), for comparing with a sidecar."""
    return json.loads(dumps_json(obj))


# --------------------------------------------------------------------------- seeds and devices

SEED_STREAMS = ("init", "data", "attack", "guard")


def seed_streams(seed: int) -> dict[str, int]:
    """Independent seeds per randomness stream, derived from one user seed."""
    children = np.random.SeedSequence(seed).spawn(len(SEED_STREAMS))
    return {name: int(child.generate_state(1, np.uint64)[0] >> 1) for name, child in zip(SEED_STREAMS, children)}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"device {name!r} requested but CUDA is not available; use --device cpu or auto")
    return device


def generator_for(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# --------------------------------------------------------------------------- one call from params


def subset(data: InMemoryDataset, limit: int | None) -> InMemoryDataset:
    if limit is None or limit >= len(data):
        return data
    return InMemoryDataset(data.images[:limit], data.labels[:limit], data.keys[:limit], data.classes)


def fit(train: InMemoryDataset, val: InMemoryDataset, params: TrainParams, progress: bool = True,
        resume_dir: Path | None = None, inputs: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build, train and check a model as `params` say; return it and a description for its sidecar.

    With `resume_dir`, the state after each epoch is saved there and a run killed
    part-way continues from it; `inputs` (the data's hashes) joins the params in the
    fingerprint, so a state saved from other data or params is not resumed.
    """
    device = resolve_device(params.device)
    seeds = seed_streams(params.seed)
    train = subset(train, params.limit)
    channels, height = train.images.shape[1], train.images.shape[2]
    model = seeded_model(params.arch, len(train.classes), channels, height, seeds["init"], device)
    adversary, guard, stateful = None, None, {}
    if params.adversarial is not None:
        adv = params.adversarial
        attack_generator = generator_for(seeds["attack"], device)
        adversary = make_adversary(adv, attack_generator)
        guard = OverfitGuard(val.images[:adv.guard_size].to(device), val.labels[:adv.guard_size].to(device),
                             PGDConfig(threat_model(adv.threat, adv.eps), 10, adv.eps / 4),
                             generator_for(seeds["guard"], device), adv.guard_drop)
        stateful = {"attack": attack_generator, "guard": guard}
    resume = None
    if resume_dir is not None:
        fingerprint = {"params": params.model_dump(mode="json"), "inputs": inputs or {}, "device": str(device)}
        resume = Resume(Path(resume_dir) / RESUME_FILE, fingerprint, stateful)
    start = time.perf_counter()
    history = train_model(model, train, params, generator_for(seeds["data"], device), adversary=adversary,
                          progress=progress, on_epoch=guard, resume=resume)
    seconds = time.perf_counter() - start
    if guard is not None:
        guard.restore_best(model)
        for entry, accuracy in zip(history, guard.history):
            entry["val_pgd10_accuracy"] = accuracy
    val_report = accuracy_report(predict(model, val.images).cpu(), val.labels.cpu(), len(val.classes))
    return model, {
        "arch": params.arch, "num_classes": len(train.classes), "in_channels": channels, "image_size": height,
        "classes": train.classes, "params": params.model_dump(mode="json"), "seeds": seeds,
        "train_samples": len(train), "history": history, "train_seconds": seconds, "device": str(device),
        "val": {"accuracy": val_report["accuracy"], "per_class": val_report["per_class"]},
    }


def evaluate_model(model: nn.Module, test: InMemoryDataset, attacks: list[AttackParams], *,
                   limit: int | None = None, batch_size: int = 500, seed: int = 0,
                   progress: bool = False) -> dict[str, Any]:
    """Clean accuracy on all of `test`; robust accuracy under each PGD attack on its first `limit` images.

    Attacks run in fp32 (no autocast), so low precision cannot weaken them.
    """
    device = next(model.parameters()).device
    num_classes = len(test.classes)
    clean_predictions = predict(model, test.images).cpu()
    clean = accuracy_report(clean_predictions, test.labels.cpu(), num_classes)
    attacked = subset(test, limit)
    clean_attacked = (clean_predictions[:len(attacked)] == attacked.labels.cpu()).float().mean().item()
    robust = []
    for attack in attacks:
        config = PGDConfig(threat_model(attack.threat, attack.eps), attack.steps, attack.step_size,
                           restarts=attack.restarts)
        start = time.perf_counter()
        predictions = adversarial_predict(model, attacked.images, attacked.labels, config,
                                          generator_for(seed_streams(seed)["attack"], device),
                                          batch_size=batch_size, progress=progress)
        report = accuracy_report(predictions, attacked.labels.cpu(), num_classes)
        robust.append({**attack.model_dump(), "accuracy": report["accuracy"], "per_class": report["per_class"],
                       "n": report["n"], "clean_accuracy_same_images": clean_attacked,
                       "seconds": time.perf_counter() - start})
    return {"clean": clean, "robust": robust}


def model_metrics(result: dict[str, Any]) -> dict[str, float]:
    """One evaluated model's clean accuracy and robust accuracy per attack (`robust_<threat>_<eps>`)."""
    return {"clean_accuracy": result["clean"]["accuracy"],
            **{f"robust_{a['threat']}_{a['eps']:g}": a["accuracy"] for a in result["robust"]}}


def evaluation_metrics(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """model_metrics per model directory name (metrics.json: DVC metrics, CI gates)."""
    return {Path(r["model"]).name: model_metrics(r) for r in results}

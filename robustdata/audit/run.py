"""One audit of an in-memory training set through a model: the features, then every per-class decision.

The audit stage (robustdata/tasks/audit.py), the benchmarks and the API call this, so what they measure is
what the stage does.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from robustdata.audit import sensitivity
from robustdata.audit.features import extract_features
from robustdata.audit.methods.base import Probe
from robustdata.audit.scoring import AuditResult, run_audit
from robustdata.audit.transplant import REFERENCE_PER_CLASS
from robustdata.config import AuditParams, TrainParams
from robustdata.data.memory import InMemoryDataset
from robustdata.train.training import fit, generator_for, predict

UNSET = object()


def audit_dataset(model: nn.Module, data: InMemoryDataset, params: AuditParams, *,
                  features: torch.Tensor | None = None, eps: float | None | object = UNSET,
                  methods: tuple[str, ...] | None = None, progress: bool = False) -> AuditResult:
    """Audit `data` (uint8 images) through `model` (on its device) with `params`' options; `eps` and
    `methods` override params' (eps None: the eps-free audit). `features`: the (N, D) representation when
    it was extracted elsewhere (Dask chunks). The result's seconds hold "features" (0 when passed in).
    Raises scoring.NonFiniteFeaturesError when some features are NaN or inf."""
    device = next(model.parameters()).device
    start = time.perf_counter()
    if features is None:
        features = extract_features(model, data.images, params.layer, batch_size=params.batch_size,
                                    progress=progress)
    feature_seconds = time.perf_counter() - start
    inputs = data.images.to(device).flatten(1).float().div_(255.0)
    result = run_audit(features.to(device), inputs, data.labels.to(device), len(data.classes),
                       eps=params.eps if eps is UNSET else eps, methods=methods or tuple(params.methods),
                       removal_method=params.removal_method, rank=params.rank, filter_rank=params.filter_rank,
                       spectral_k=params.spectral_k, kappa=params.kappa, eps_scope=params.eps_scope,
                       generator=generator_for(params.seed, device), probe=probe_of(model, data, params.seed))
    result.seconds = {"features": feature_seconds, **result.seconds}
    return result


def probe_of(model: nn.Module, data: InMemoryDataset, seed: int) -> Probe:
    """The images and the model for the methods that ask the model, with a reference sample of up to
    REFERENCE_PER_CLASS images of each class (drawn from its own seeded stream, so the audit's draws do not
    depend on whether such a method runs)."""
    generator = torch.Generator().manual_seed(seed)
    labels = data.labels.cpu()
    rows = [torch.nonzero(labels == label).flatten() for label in range(len(data.classes))]
    reference = torch.cat([r[torch.randperm(len(r), generator=generator)[:REFERENCE_PER_CLASS]] for r in rows])
    return Probe(data.images, lambda images: predict(model, images), reference, labels[reference],
                 predict(model, data.images[reference]))


def stated_sensitivity(data: InMemoryDataset, val: InMemoryDataset, recipe: TrainParams, params: AuditParams,
                       rounds: int) -> dict:
    """The audit's sensitivity on `data` (sensitivity.py): `rounds` canary rounds, each retraining `recipe` (the
    audited model's) on a planted copy and auditing it as `params` say."""
    def retrain(planted: InMemoryDataset) -> nn.Module:
        return fit(planted, val, recipe, progress=False)[0]

    def audit(model: nn.Module, planted: InMemoryDataset) -> AuditResult:
        return audit_dataset(model, planted, params, eps=None)

    return sensitivity.measure(data, retrain, audit, rounds, params.seed)

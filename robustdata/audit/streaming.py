"""Streaming audit: the audit of scoring.py in O(N q + classes D^2) memory instead of O(N D).

run_audit needs every representation (N, D) in memory: 4 GB for 1M samples of
a 1024-dim layer. The per-class decisions only read each class's top-q
principal coordinates (q = filter_rank, 16, and clustering's 10), so this path
computes those from a stream of image batches in two passes:

1. features batch by batch; per class the count, mean and scatter matrix
   (float64, D x D, merged batch by batch with the pairwise update of Chan,
   Golub, LeVeque 1979, so a class mean far from zero loses no precision) and
   the sum of its inputs (the input-space centroids that pick the poison side);
   then per class the top-q eigenvectors of the covariance (torch.linalg.eigh:
   exact, where run_audit uses a seeded randomized range finder);
2. features again; each sample's centred coordinates on its class's q
   directions (float32) and its input-space distance to the nearest other
   class's centroid.

Then scoring.audit_classes makes exactly the per-class decisions of run_audit on
those coordinates. Results agree with run_audit up to the PCA (exact here,
randomized there) and the generator draws that follow from it: the same
classes judged poisoned and nearly the same flags.

STREAM_METHODS are the registered methods with streams_by_default. SPECTRE
runs only when asked for (it is left out of them): it reads
`rank` (64) coordinates per sample instead of 16, so N * rank floats. Memory:
classes * D^2 * 8 bytes of scatter matrices (10 classes at D = 1024: 80 MB;
too much for 1000 classes of a 2048-dim layer), N * (4 q + 24 + 9 m) bytes of
coordinates, labels, the input-space distances and nearest class and the m methods' scores and flags, and one batch of
activations.

Time is linear in N: two inference passes, a (b_c, D) x (D, D) product per
class and batch, and per-class decisions that are sorts and k-means
iterations over n_c x q coordinates.

The stream is any re-iterable of (images (B, C, H, W), labels (B,)) batches,
or a function returning a fresh iterator: a list, a DataLoader over
robustdata.data.stream.ShardStream, TensorBatches below. It must yield the
same samples in the same order on both passes (no shuffling): the labels are
compared. uint8 images are scaled to [0, 1]; float images are taken as they
are (in [0, 1]). Batches may hold any mix of classes. Pure compute: the device
is the model's; the generator must live there too.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from robustdata.train.attacks import evaluating
from robustdata.audit.filtering import KAPPA, InputDistances, centroid_distances
from robustdata.audit.methods import registry
from robustdata.audit.methods.base import AuditOptions
from robustdata.audit.scoring import (AuditResult, NonFiniteFeaturesError, audit_classes, check_options, is_constant,
                                      min_samples, pca_rank, size_status)
from robustdata.audit.spectral import ClassPCA
from robustdata.data.manifest import Dataset
from robustdata.data.shards import iter_shards
from robustdata.errors import RobustDataError
from robustdata.train.models import representation
from robustdata.progress import progress_bar

STREAM_METHODS = tuple(name for name, method in registry().items() if method.streams_by_default)
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class StreamAuditResult(AuditResult):
    labels: torch.Tensor | None = None  # (N,) int64, in stream order (what the scores are indexed by)


def shard_batches(dataset: Dataset, batch_size: int) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """A stream of a dataset's (uint8 images (B, C, H, W), labels (B,)) batches in its shards' order (the
    manifest's), decoded shard by shard: a fresh iterator per call, one batch in memory."""
    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images: list[np.ndarray] = []
        labels: list[int] = []
        for sample in iter_shards(dataset.shards, num_classes=len(dataset.classes)):
            images.append(sample.image)
            labels.append(sample.label)
            if len(images) == batch_size:
                yield torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), torch.tensor(labels)
                images, labels = [], []
        if images:
            yield torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), torch.tensor(labels)
    return batches


def in_memory_bytes(card: dict, feature_dim: int = 512) -> int:
    """What the in-memory audit of a dataset holds: its decoded images (uint8) and one float32 feature row of
    `feature_dim` (a typical penultimate layer) per sample, twice over for the working copies."""
    height, width, channels = card.get("image_shape") or (224, 224, 3)
    return 2 * card["num_samples"] * (height * width * channels + 4 * feature_dim)


def memory_bytes() -> int:
    """The machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def should_stream(choice: bool | None, card: dict) -> bool:
    """Whether to audit by streaming: as asked, or (None) when the in-memory audit would take more than half
    the machine's memory."""
    if choice is not None:
        return choice
    return in_memory_bytes(card) > memory_bytes() // 2


class TensorBatches:
    """Re-iterable batches of in-memory images (N, C, H, W) and labels (N,), in order."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000):
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.labels), self.batch_size):
            yield self.images[start:start + self.batch_size], self.labels[start:start + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)


def stream_audit(model: nn.Module, batches: Batches | Callable[[], Batches], num_classes: int, *,
                 layer: str = "penultimate", eps: float | None = None, methods: tuple[str, ...] = STREAM_METHODS,
                 removal_method: str = "filter", rank: int = 64, filter_rank: int = 16, spectral_k: int = 1,
                 kappa: float = KAPPA, eps_scope: str = "poisoned", generator: torch.Generator,
                 progress: bool = False) -> StreamAuditResult:
    """Audit a stream of image batches through `model`'s `layer` (options as scoring.run_audit).

    Raises NonFiniteFeaturesError (after the first pass, naming the samples) when some features are NaN/inf,
    RobustDataError for a malformed stream or one that changes between its two passes.
    """
    check_options(methods, removal_method, eps, eps_scope)
    make = _iterator_factory(batches)
    device = next(model.parameters()).device
    if generator.device.type != device.type:
        raise RobustDataError(f"the generator is on {generator.device} but the model on {device}: "
                              "create it with torch.Generator(device=...)")
    options = AuditOptions(eps=eps, eps_scope=eps_scope, rank=rank, filter_rank=filter_rank, spectral_k=spectral_k,
                           kappa=kappa)
    q = pca_rank(methods, options)
    seconds: dict[str, float] = {}
    with evaluating(model), torch.no_grad():
        start = time.perf_counter()
        moments = _first_pass(model, make(), num_classes, layer, device, progress)
        seconds["pass1"] = time.perf_counter() - start
        start = time.perf_counter()
        bases = moments.principal(q, min_samples(filter_rank))
        seconds["directions"] = time.perf_counter() - start
        start = time.perf_counter()
        coords, distances, skew = _second_pass(model, make(), moments, bases, layer, device, progress)
        seconds["pass2"] = time.perf_counter() - start
    start = time.perf_counter()
    labels = moments.labels
    order = torch.argsort(labels, stable=True)
    offsets = [0] + torch.cumsum(torch.tensor(moments.counts), 0).tolist()

    def pca_of(label: int) -> ClassPCA:
        index = order[offsets[label]:offsets[label + 1]]
        mean, total_variance = moments.mean[label], moments.total_variance(label)
        if label not in bases:  # constant: only its moments are read
            none = {"dtype": torch.float64, "device": device}
            return ClassPCA(index, torch.zeros(len(index), 0, **none), torch.zeros(0, **none), mean,
                            torch.zeros(len(mean), 0, **none), total_variance)
        directions, variances = bases[label]
        sign = skew[label].sign()
        sign[sign == 0] = 1  # class_pca's convention: each direction's heavy side is positive
        return ClassPCA(index, coords[index, :directions.shape[1]].double() * sign, variances, mean,
                        directions * sign, total_variance)

    scores, flagged, per_class, threshold = audit_classes(
        pca_of, moments.counts, distances, methods=methods, removal_method=removal_method, options=options,
        generator=generator)
    seconds["scoring"] = time.perf_counter() - start
    return StreamAuditResult(scores, flagged, per_class, removal_method, eps, threshold, seconds, labels)


# ------------------------------------------------------------------------------------------- the stream


def _iterator_factory(batches: Batches | Callable[[], Batches]) -> Callable[[], Iterator]:
    if callable(batches) and not hasattr(batches, "__iter__"):
        return lambda: iter(batches())
    if iter(batches) is batches:
        raise RobustDataError("the streaming audit reads its data twice: pass a re-iterable (a list, a DataLoader, "
                              "TensorBatches) or a function returning a fresh iterator, not a one-shot iterator")
    return lambda: iter(batches)


def _batches(iterator: Iterator, num_classes: int, device: torch.device, desc: str, progress: bool
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images float (B, C, H, W) in [0, 1], labels int64 (B,)) on `device`, validated."""
    for number, (images, labels) in enumerate(progress_bar(iterator, desc=desc, unit="batch", disable=not progress,
                                                           leave=False)):
        labels = torch.as_tensor(labels).to(device=device, dtype=torch.long)
        if images.dim() != 4 or labels.dim() != 1 or len(images) != len(labels):
            raise RobustDataError(f"batch {number}: images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                                  "must be (B, C, H, W) and (B,)")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise RobustDataError(f"batch {number}: labels must be in [0, {num_classes}); got "
                                  f"{int(labels.min())}..{int(labels.max())}")
        images = images.to(device)
        images = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        yield images, labels


def _features(model: nn.Module, images: torch.Tensor, layer: str) -> torch.Tensor:
    return representation(model, images, layer).float()  # fp32, as extract_features


# --------------------------------------------------------------------------------------------- pass 1


class _Moments:
    """Per-class count, mean (D,) and scatter matrix (D, D), float64, and input sums (P,)."""

    def __init__(self, num_classes: int, device: torch.device):
        self.num_classes, self.device = num_classes, device
        self.counts = [0] * num_classes
        self.mean: dict[int, torch.Tensor] = {}
        self.scatter: dict[int, torch.Tensor] = {}
        self.input_sum: torch.Tensor | None = None
        self.labels = torch.zeros(0, dtype=torch.long, device=device)

    def add(self, features: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        if self.input_sum is None:
            self.input_sum = torch.zeros(self.num_classes, inputs.shape[1], dtype=torch.float64, device=self.device)
        # float32 sums of one batch, float64 across batches: no (B, P) float64 copy of large images
        self.input_sum += torch.zeros(self.num_classes, inputs.shape[1], device=self.device).index_add_(
            0, labels, inputs).double()
        for label in torch.unique(labels).tolist():
            self._merge(label, features[labels == label])

    def _merge(self, label: int, x: torch.Tensor) -> None:
        n_b = len(x)
        mean_b = x.double().mean(0)
        rounded = mean_b.float()
        centred = x - rounded
        # scale by a power of two (exact) so the float32 product cannot overflow, whatever the magnitudes
        scale = torch.exp2(torch.ceil(torch.log2(centred.abs().max().clamp_min(1e-30))))
        scaled = centred / scale
        scatter_b = (scaled.T @ scaled).double() * scale.double() ** 2
        shift = mean_b - rounded.double()  # about the exact mean, not the float32-rounded one
        scatter_b.addr_(shift, shift, alpha=-n_b)
        n_a = self.counts[label]
        if n_a == 0:
            self.mean[label], self.scatter[label] = mean_b, scatter_b
        else:
            n = n_a + n_b
            delta = mean_b - self.mean[label]
            self.mean[label] += delta * (n_b / n)
            self.scatter[label].add_(scatter_b).addr_(delta, delta, alpha=n_a * n_b / n)
        self.counts[label] += n_b

    def total_variance(self, label: int) -> float:
        return float(torch.trace(self.scatter[label])) / max(self.counts[label] - 1, 1)

    def centroids(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(input-space centroids (C, P), present (C,) bool)."""
        counts = torch.tensor(self.counts, dtype=torch.float64, device=self.device)
        present = counts > 0
        return (self.input_sum / counts.clamp_min(1)[:, None]).to(dtype), present

    def principal(self, q: int, need: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """label -> (directions (D, q_c) float64, variances (q_c,)) for the classes the audit can score."""
        bases = {}
        for label, count in enumerate(self.counts):
            if size_status(count, need) is not None or is_constant(self.total_variance(label), self.mean[label]):
                continue
            cov = self.scatter[label] / (count - 1)
            values, vectors = torch.linalg.eigh(cov)  # ascending
            q_c = min(q, count, len(cov))  # as class_pca: no more directions than samples
            bases[label] = vectors[:, -q_c:].flip(1), values[-q_c:].flip(0).clamp_min(0)
        return bases


def _first_pass(model: nn.Module, iterator: Iterator, num_classes: int, layer: str, device: torch.device,
                progress: bool) -> _Moments:
    moments = _Moments(num_classes, device)
    labels_seen, bad_rows, bad_labels = [], [], []
    offset = 0
    for images, labels in _batches(iterator, num_classes, device, "audit pass 1", progress):
        features = _features(model, images, layer)
        finite = torch.isfinite(features).all(1)
        if not bool(finite.all()):  # counted and reported after the pass, kept out of the moments
            rows = torch.nonzero(~finite).flatten()
            bad_rows.append(rows + offset)
            bad_labels.append(labels[rows])
            features, images, kept_labels = features[finite], images[finite], labels[finite]
        else:
            kept_labels = labels
        if len(kept_labels):
            moments.add(features, images.flatten(1), kept_labels)
        labels_seen.append(labels)
        offset += len(labels)
    if offset == 0:
        raise RobustDataError("the stream yielded no samples")
    if bad_rows:
        rows = torch.cat(bad_rows)
        raise NonFiniteFeaturesError.from_rows(rows, torch.cat(bad_labels), offset)
    moments.labels = torch.cat(labels_seen)
    return moments


# --------------------------------------------------------------------------------------------- pass 2


def _second_pass(model: nn.Module, iterator: Iterator, moments: _Moments,
                 bases: dict[int, tuple[torch.Tensor, torch.Tensor]], layer: str, device: torch.device,
                 progress: bool) -> tuple[torch.Tensor, InputDistances, dict[int, torch.Tensor]]:
    """(coordinates (N, q) float32, input distances to the class centroids (N,), per-class sum of cubed
    coordinates)."""
    n = len(moments.labels)
    width = max((d.shape[1] for d, _ in bases.values()), default=0)
    coords = torch.zeros(n, width, device=device)
    distances = InputDistances(torch.zeros(n, device=device), torch.zeros(n, device=device),
                               torch.zeros(n, dtype=torch.int64, device=device))
    skew = {label: torch.zeros(d.shape[1], dtype=torch.float64, device=device) for label, (d, _) in bases.items()}
    projections = {label: (moments.mean[label].float(), d.float()) for label, (d, _) in bases.items()}
    centroids, present = None, None
    offset = 0
    for images, labels in _batches(iterator, moments.num_classes, device, "audit pass 2", progress):
        if offset + len(labels) > n or not torch.equal(labels, moments.labels[offset:offset + len(labels)]):
            raise RobustDataError(f"the stream changed between its two passes (at sample {offset}): it must yield "
                                  "the same samples in the same order both times (no shuffling)")
        inputs = images.flatten(1)
        if centroids is None:
            centroids, present = moments.centroids(inputs.dtype)
        batch = centroid_distances(inputs, labels, centroids, present)
        distances.own[offset:offset + len(labels)] = batch.own
        distances.nearest_other[offset:offset + len(labels)] = batch.nearest_other
        distances.nearest_other_class[offset:offset + len(labels)] = batch.nearest_other_class
        features = _features(model, images, layer)
        for label in torch.unique(labels).tolist():
            if label not in projections:
                continue
            rows = torch.nonzero(labels == label).flatten()
            mean, directions = projections[label]
            values = (features[rows] - mean) @ directions  # (b_c, q_c)
            coords[offset + rows, :values.shape[1]] = values
            skew[label] += (values.double() ** 3).sum(0)
        offset += len(labels)
    if offset != n:
        raise RobustDataError(f"the stream yielded {n} samples on its first pass and {offset} on its second: "
                              "it must yield the same samples both times")
    return coords, distances, skew


"""The streaming audit (robustdata/audit/streaming.py) flags what the in-memory audit flags, batch by batch.

The planted representations of test_audit.py ride inside "images": each image
is the sample's input-space vector followed by its representation scaled by
1e-3, and the model's layer `pick` scales the representation back. So
run_audit (features in memory) and stream_audit (two passes over batches) see
exactly the same data; they differ only in the PCA (randomized there, exact
here) and the generator draws that follow from it.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from robustdata.audit.features import extract_features
from robustdata.audit.methods import registry
from robustdata.audit.metrics import confusion
from robustdata.audit.scoring import run_audit
from robustdata.audit.streaming import STREAM_METHODS, TensorBatches, _Moments, stream_audit
from robustdata.errors import RobustDataError
from robustdata.train.models import SmallCNN, representation
from test_audit import INPUT_DIM, NUM_CLASSES, SHIFT, STRONG_SHIFT, planted
from test_audit import one_torch_thread, prefect_server  # noqa: F401  (fixtures: one thread, no Prefect)

FEATURE_SCALE = 1e-3  # the representation's share of the image, so input-space distances are the planted ones


class Pick(nn.Module):
    """Layer `pick`: the flattened image from column `start` on, times `scale`."""

    def __init__(self, start: int, scale: float):
        super().__init__()
        self.start, self.scale = start, scale
        self.unused = nn.Parameter(torch.zeros(1))  # the stream reads the device from the parameters
        self.pick = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(x.flatten(1)[:, self.start:] * self.scale)


PICK = Pick(INPUT_DIM, 1 / FEATURE_SCALE)


@functools.lru_cache(maxsize=None)
def planted_images(fraction: float, shift: float, shuffle: bool = True):
    """(images (N, 1, 1, P + D) float, labels, is_poison), shuffled so every batch mixes classes."""
    data = planted(fraction, shift)
    order = (torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(1)) if shuffle
             else torch.arange(len(data.labels)))
    images = torch.cat([data.inputs, data.features * FEATURE_SCALE], 1)[order][:, None, None, :]
    return images, data.labels[order], data.is_poison[order]


@functools.lru_cache(maxsize=None)
def both(fraction: float, shift: float, eps: float | None = None, batch_size: int = 333):
    images, labels, truth = planted_images(fraction, shift)
    with torch.no_grad():
        features = representation(PICK, images, "pick")
    memory = run_audit(features, images.flatten(1), labels, NUM_CLASSES, eps=eps, methods=STREAM_METHODS,
                       generator=torch.Generator().manual_seed(0))
    stream = stream_audit(PICK, TensorBatches(images, labels, batch_size), NUM_CLASSES, layer="pick", eps=eps,
                          generator=torch.Generator().manual_seed(0))
    return memory, stream, truth


@pytest.mark.parametrize("fraction, shift", [(0.10, STRONG_SHIFT), (0.30, SHIFT), (0.50, SHIFT), (0.0, SHIFT)])
def test_stream_flags_what_the_in_memory_audit_flags(fraction, shift):
    memory, stream, truth = both(fraction, shift)
    assert torch.equal(stream.labels, planted_images(fraction, shift)[1])
    assert [c["poisoned"] for c in stream.classes] == [c["poisoned"] for c in memory.classes]
    assert [c["status"] for c in stream.classes] == ["ok"] * NUM_CLASSES
    for ours, theirs in zip(stream.classes, memory.classes):
        assert ours["statistic"] == pytest.approx(theirs["statistic"], rel=0.05)
    assert confusion(stream.removed, truth)["tpr"] == confusion(memory.removed, truth)["tpr"]
    if fraction:
        assert confusion(stream.removed, truth)["tpr"] >= 0.99
    for method in STREAM_METHODS:
        assert torch.isfinite(stream.scores[method]).all()
        differ = int((stream.flagged[method] ^ memory.flagged[method]).sum())
        assert differ <= 0.01 * max(1, int((stream.flagged[method] | memory.flagged[method]).sum())), method


def test_stream_eps_mode_removes_the_same_poisons_within_the_same_budgets():
    """eps mode: the filter fills its budget past the poisons with a seeded uniform draw, whose draws differ
    between the paths (the generator's history differs); the poisons removed and the budgets are the same."""
    memory, stream, truth = both(0.10, STRONG_SHIFT, eps=0.10)
    assert [c["budget"] for c in stream.classes] == [c["budget"] for c in memory.classes]
    assert [c["flagged"] for c in stream.classes] == [c["flagged"] for c in memory.classes]
    assert torch.equal(stream.removed & truth, memory.removed & truth)
    assert torch.equal(stream.flagged["spectral"], memory.flagged["spectral"])


def straddling_batches(images: torch.Tensor, labels: torch.Tensor, sizes: list[int]) -> list:
    batches, start = [], 0
    for size in sizes:
        batches.append((images[start:start + size], labels[start:start + size]))
        start += size
    return batches


def test_batches_that_straddle_classes_give_the_same_audit():
    """Sorted by class with batch boundaries inside classes, ragged batches (of 1 sample too), and shuffled
    batches mixing every class: the same flags and (to float rounding) the same scores."""
    images, labels, _ = planted_images(0.30, SHIFT, shuffle=False)  # sorted by class: 1000 per class
    sizes = [1, 998, 2, 333, 666, 1, 1000, 999]
    ragged = straddling_batches(images, labels, sizes + [len(labels) - sum(sizes)])
    assert any(len(set(batch_labels.tolist())) > 1 for _, batch_labels in ragged)  # some straddle a boundary
    runs = [stream_audit(PICK, batches, NUM_CLASSES, layer="pick", generator=torch.Generator().manual_seed(0))
            for batches in (ragged, TensorBatches(images, labels, 4000), TensorBatches(images, labels, 777))]
    for run in runs[1:]:
        for method in STREAM_METHODS:
            assert torch.equal(run.flagged[method], runs[0].flagged[method]), method
            # float32 coordinates: batch-dependent rounding of the moments moves a score by ~1e-5 relative
            torch.testing.assert_close(run.scores[method], runs[0].scores[method], rtol=1e-3, atol=1e-4)
    # and against the shuffled stream, by sample: the same poisons flagged
    _, shuffled, truth = both(0.30, SHIFT)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))
    assert torch.equal(runs[0].removed[order], shuffled.removed)


def test_streamed_moments_match_the_covariance_of_all_features():
    """Chan's pairwise merge keeps float64 precision for a class mean far from zero (1e3 sd's away)."""
    g = torch.Generator().manual_seed(0)
    features = 1e3 + torch.randn(3000, 12, generator=g) @ torch.randn(12, 12, generator=g)
    labels = torch.randint(3, (3000,), generator=g)
    inputs = torch.rand(3000, 5, generator=g)
    moments = _Moments(3, torch.device("cpu"))
    for start in range(0, 3000, 256):
        rows = slice(start, start + 256)
        moments.add(features[rows], inputs[rows], labels[rows])
    for label in range(3):
        x = features[labels == label].double()
        assert moments.counts[label] == len(x)
        torch.testing.assert_close(moments.mean[label], x.mean(0), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(moments.scatter[label] / (len(x) - 1), torch.cov(x.T), rtol=1e-5, atol=1e-5)
    centroids, present = moments.centroids(torch.float64)
    assert present.all()
    torch.testing.assert_close(centroids[1], inputs[labels == 1].double().mean(0))


def test_stream_reads_uint8_images_through_a_cnn_like_the_in_memory_audit():
    """The audited model's representation of real uint8 images (1x8x8, four prototypes plus noise, a 3x3
    trigger on 8% of class 0 drawn from the other classes): both paths find the same class and poisons."""
    g = torch.Generator().manual_seed(0)
    prototypes = torch.rand(4, 1, 8, 8, generator=g) * 200
    labels = torch.arange(4).repeat_interleave(300)
    source = labels.clone()
    poisons = torch.nonzero(labels == 0).flatten()[:24]
    source[poisons] = torch.randint(1, 4, (24,), generator=g)
    images = (prototypes[source] + 25 * torch.randn(len(labels), 1, 8, 8, generator=g)).clamp(0, 255)
    images[poisons, :, :3, :3] = 255.0
    images = images.round().to(torch.uint8)
    truth = torch.zeros(len(labels), dtype=torch.bool)
    truth[poisons] = True
    torch.manual_seed(0)
    model = SmallCNN(num_classes=4, in_channels=1, image_size=8)
    features = extract_features(model, images, "penultimate")
    memory = run_audit(features, images.flatten(1).float() / 255, labels, 4, methods=STREAM_METHODS,
                       generator=torch.Generator().manual_seed(0))
    stream = stream_audit(model, TensorBatches(images, labels, 250), 4, generator=torch.Generator().manual_seed(0))
    assert [c["poisoned"] for c in stream.classes] == [c["poisoned"] for c in memory.classes] == [True] + [False] * 3
    assert confusion(stream.removed, truth)["tpr"] == confusion(memory.removed, truth)["tpr"] == 1.0
    assert int((stream.removed ^ memory.removed).sum()) <= 2


def test_a_dataloader_of_float_images_is_a_stream():
    """What a DataLoader over robustdata.data.stream.ShardStream yields: float images in [0, 1], label tensors."""
    from torch.utils.data import DataLoader, TensorDataset

    images, labels, _ = planted_images(0.10, STRONG_SHIFT)
    loader = DataLoader(TensorDataset(images, labels), batch_size=500)
    result = stream_audit(PICK, loader, NUM_CLASSES, layer="pick", generator=torch.Generator().manual_seed(0))
    _, reference, _ = both(0.10, STRONG_SHIFT)
    assert torch.equal(result.removed, reference.removed)


def test_the_streams_default_methods_come_from_the_registry():
    """Every registered method but SPECTRE (it reads `rank` coordinates per sample), in the registry's order."""
    assert STREAM_METHODS == tuple(name for name, method in registry().items() if method.streams_by_default)
    assert STREAM_METHODS == ("dirty_label", "filter", "spectral", "clustering")


def test_stream_needs_two_identical_passes():
    images, labels, _ = planted_images(0.10, STRONG_SHIFT)
    batches = TensorBatches(images, labels, 1000)
    audit = functools.partial(stream_audit, PICK, num_classes=NUM_CLASSES, layer="pick",
                              generator=torch.Generator().manual_seed(0))
    with pytest.raises(RobustDataError, match="reads its data twice"):
        audit(iter(batches))
    assert audit(lambda: iter(batches)).removed.any()  # a function returning a fresh iterator is fine
    calls = []

    def reshuffled():
        calls.append(None)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(len(calls)))
        return iter(TensorBatches(images[order], labels[order], 1000))

    with pytest.raises(RobustDataError, match="changed between its two passes"):
        audit(reshuffled)
    with pytest.raises(RobustDataError, match=r"labels must be in \[0, 4\)"):
        audit([(images[:10], labels[:10] + 4)])
    with pytest.raises(RobustDataError, match="must be"):
        audit([(images[:10, 0], labels[:10])])
    with pytest.raises(RobustDataError, match="no samples"):
        audit([])
    with pytest.raises(RobustDataError, match=r"unknown audit method\(s\) \['magic'\]"):
        audit(batches, methods=("filter", "magic"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_stream_runs_on_cuda_and_agrees_with_cpu():
    images, labels, truth = planted_images(0.10, STRONG_SHIFT)
    cuda = torch.device("cuda")
    model = Pick(INPUT_DIM, 1 / FEATURE_SCALE).to(cuda)
    result = stream_audit(model, TensorBatches(images, labels, 1000), NUM_CLASSES, layer="pick",
                          generator=torch.Generator(device=cuda).manual_seed(0))
    _, cpu, _ = both(0.10, STRONG_SHIFT)
    assert result.removed.device.type == "cuda"
    assert [c["poisoned"] for c in result.classes] == [c["poisoned"] for c in cpu.classes]
    assert confusion(result.removed.cpu(), truth)["tpr"] == 1.0
    with pytest.raises(RobustDataError, match="generator is on"):
        stream_audit(model, TensorBatches(images, labels, 1000), NUM_CLASSES, layer="pick",
                     generator=torch.Generator().manual_seed(0))

"""Degenerate audit inputs are reported, never scored NaN or silently skipped.

Planted on the synthetic set of test_audit.py (4 classes x 1000, 10% of class 1
poisoned with a strong shift), with extra classes that are empty, tiny,
constant (identical vectors, a dead all-zero layer, float32 rounding noise on
one vector, constant images through a CNN), non-finite features (a few NaN/inf
samples, a model that outputs NaN), and forced numerical failures. Each case
runs through the in-memory audit and the streaming one; every per-class entry
must carry the expected status and every score must be finite, while the
poisoned class is still found.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import robustdata.audit.methods.filter as filter_method
import robustdata.audit.methods.spectre as spectre_method
from robustdata.audit.features import extract_features
from robustdata.audit.metrics import confusion
from robustdata.audit.scoring import (METHODS, NonFiniteFeaturesError, STATUS_CONSTANT, STATUS_EMPTY, STATUS_OK,
                                      AuditResult, min_samples, run_audit)
from robustdata.audit.streaming import TensorBatches, stream_audit
from robustdata.errors import DataError, RobustDataError
from robustdata.train.models import SmallCNN
from robustdata.report.documents import audit_markdown
from test_audit import INPUT_DIM, NUM_CLASSES, POISON_CLASS, STRONG_SHIFT, planted
from test_audit import one_torch_thread, prefect_server  # noqa: F401  (fixtures: one thread, no Prefect)
from test_audit_stream import FEATURE_SCALE, PICK

NEED = min_samples(16)  # the default filter_rank


def with_extra_classes(extra: list[torch.Tensor], seed: int = 0):
    """(features, inputs, labels, is_poison, num_classes): the planted set plus one class per (n, D) block."""
    base = planted(0.10, STRONG_SHIFT)
    g = torch.Generator().manual_seed(seed)
    labels = [base.labels] + [torch.full((len(block),), NUM_CLASSES + k) for k, block in enumerate(extra)]
    inputs = [base.inputs] + [3 * torch.randn(len(block), base.inputs.shape[1], generator=g) for block in extra]
    features = torch.cat([base.features, *extra])
    is_poison = torch.cat([base.is_poison, torch.zeros(len(features) - len(base.features), dtype=torch.bool)])
    return features, torch.cat(inputs), torch.cat(labels), is_poison, NUM_CLASSES + len(extra)


def audit_both(features, inputs, labels, num_classes, **options):
    """The in-memory and the streaming audit of the same data (representations carried in the images)."""
    memory = run_audit(features, inputs, labels, num_classes, methods=METHODS,
                       generator=torch.Generator().manual_seed(0), **options)
    images = torch.cat([inputs, features * FEATURE_SCALE], 1)[:, None, None, :]
    stream = stream_audit(PICK, TensorBatches(images, labels, 700), num_classes, layer="pick", methods=METHODS,
                          generator=torch.Generator().manual_seed(0), **options)
    return memory, stream


def assert_sane(result: AuditResult, labels: torch.Tensor, is_poison: torch.Tensor | None = None) -> None:
    """Finite scores; degenerate classes unscored and unflagged; JSON-safe entries; the planted class found."""
    for method, scores in result.scores.items():
        assert torch.isfinite(scores).all(), method
    json.dumps(result.classes, allow_nan=False)
    for entry in result.classes:
        assert entry["status"]
        if entry["status"] != STATUS_OK:
            assert entry["statistic"] is None and not entry["poisoned"]
            assert entry["budget"] == entry["flagged"] == entry["estimated_poisons"] == 0
            members = labels == entry["label"]
            assert not any(flags[members].any() for flags in result.flagged.values())
            assert not any(scores[members].any() for scores in result.scores.values())
    if is_poison is not None:
        assert [c["label"] for c in result.classes if c["poisoned"]] == [POISON_CLASS]
        assert confusion(result.removed, is_poison)["tpr"] == 1.0


# ------------------------------------------------------------------------------------------ too few samples

SIZES = [0, 1, 3, NEED - 1, NEED]
EXPECTED_SIZE_STATUS = [STATUS_EMPTY, f"too_few_samples (n=1, need {NEED})", f"too_few_samples (n=3, need {NEED})",
                        f"too_few_samples (n={NEED - 1}, need {NEED})", STATUS_OK]


@pytest.mark.parametrize("options", [{}, {"eps": 0.1}, {"eps": 0.1, "eps_scope": "all"}], ids=["auto", "eps", "all"])
def test_empty_and_tiny_classes_are_reported(options):
    g = torch.Generator().manual_seed(3)
    extra = [5 * torch.randn(n, planted(0.10).features.shape[1], generator=g) for n in SIZES]
    features, inputs, labels, is_poison, num_classes = with_extra_classes(extra)
    for result in audit_both(features, inputs, labels, num_classes, **options):
        statuses = [c["status"] for c in result.classes]
        assert statuses == [STATUS_OK] * NUM_CLASSES + EXPECTED_SIZE_STATUS
        assert [c["n"] for c in result.classes[NUM_CLASSES:]] == SIZES
        assert_sane(result, labels, is_poison)


def test_minimum_follows_the_filter_rank():
    features, inputs, labels, is_poison, num_classes = with_extra_classes([torch.randn(40, 64)])
    result = run_audit(features, inputs, labels, num_classes, filter_rank=4, generator=torch.Generator().manual_seed(0))
    assert min_samples(4) == 24 and result.classes[-1]["status"] == STATUS_OK
    result = run_audit(features, inputs, labels, num_classes, generator=torch.Generator().manual_seed(0))
    assert result.classes[-1]["status"] == f"too_few_samples (n=40, need {NEED})"


# ----------------------------------------------------------------------------------------- constant classes

def constant_blocks(n: int = 200, dim: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    vector = 3 * torch.randn(1, dim, generator=g)
    return {
        "identical": vector.repeat(n, 1),
        "all_zero": torch.zeros(n, dim),  # a dead ReLU layer
        # the same image in different batches: a few ulps of float32 rounding apart
        "rounding_noise": vector * (1 + 1e-7 * torch.randn(n, dim, generator=g)),
    }


@pytest.mark.parametrize("kind", ["identical", "all_zero", "rounding_noise"])
def test_a_constant_class_is_reported_with_finite_scores(kind):
    features, inputs, labels, is_poison, num_classes = with_extra_classes([constant_blocks()[kind]])
    for result in audit_both(features, inputs, labels, num_classes):
        assert [c["status"] for c in result.classes] == [STATUS_OK] * NUM_CLASSES + [STATUS_CONSTANT]
        assert_sane(result, labels, is_poison)
        assert (result.scores["filter"][labels == NUM_CLASSES] == 0).all()


def test_a_class_of_two_distinct_points_is_not_constant_and_stays_finite():
    """Not degenerate in the sense above (it varies), but its split has zero within-side spread."""
    g = torch.Generator().manual_seed(5)
    features, inputs, labels, is_poison, num_classes = with_extra_classes(
        [torch.randn(2, 64, generator=g).repeat(100, 1)])
    for result in audit_both(features, inputs, labels, num_classes):
        assert result.classes[-1]["status"] == STATUS_OK and math.isfinite(result.classes[-1]["statistic"])
        for scores in result.scores.values():
            assert torch.isfinite(scores).all()


def constant_image_set():
    """uint8 1x8x8 images: three classes of noisy prototypes and class 3 of one constant grey image."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(150)
    prototypes = torch.rand(4, 1, 8, 8, generator=g) * 200
    images = (prototypes[labels] + 25 * torch.randn(len(labels), 1, 8, 8, generator=g)).clamp(0, 255)
    images[labels == 3] = 128.0
    torch.manual_seed(0)
    return images.round().to(torch.uint8), labels, SmallCNN(num_classes=4, in_channels=1, image_size=8)


def test_constant_images_through_a_model_are_reported():
    images, labels, model = constant_image_set()
    features = extract_features(model, images, "penultimate", batch_size=64)  # batches of varying make-up
    memory = run_audit(features, images.flatten(1).float() / 255, labels, 4, generator=torch.Generator().manual_seed(0))
    stream = stream_audit(model, TensorBatches(images, labels, 64), 4, generator=torch.Generator().manual_seed(0))
    for result in (memory, stream):
        assert [c["status"] for c in result.classes] == [STATUS_OK] * 3 + [STATUS_CONSTANT]
        assert_sane(result, labels)


@pytest.mark.parametrize("eps", [None, 0.2])
def test_no_class_auditable_gives_no_threshold(eps):
    labels = torch.arange(3).repeat_interleave(100)
    features = torch.ones(300, 8)
    features[labels == 2] = 0.0
    inputs = torch.rand(300, INPUT_DIM, generator=torch.Generator().manual_seed(0))
    for result in audit_both(features, inputs, labels, 4, eps=eps):
        assert [c["status"] for c in result.classes] == [STATUS_CONSTANT] * 3 + [STATUS_EMPTY]
        assert result.threshold is None and not result.removed.any()
        assert_sane(result, labels)


# ---------------------------------------------------------------------------------------- non-finite features

def test_nan_and_inf_features_name_how_many_samples_and_which():
    features, inputs, labels, _, num_classes = with_extra_classes([])
    features = features.clone()
    features[[7, 1500, 2500], 3] = float("nan")
    features[3999, 0] = float("inf")
    expected = "NaN or inf in 4 of 4000 samples (samples per class: 0: 1, 1: 1, 2: 1, 3: 1; first sample indices: " \
               "7, 1500, 2500, 3999)"
    with pytest.raises(NonFiniteFeaturesError) as memory:
        run_audit(features, inputs, labels, num_classes, generator=torch.Generator().manual_seed(0))
    images = torch.cat([inputs, features * FEATURE_SCALE], 1)[:, None, None, :]
    with pytest.raises(NonFiniteFeaturesError) as stream:
        stream_audit(PICK, TensorBatches(images, labels, 700), num_classes, layer="pick",
                     generator=torch.Generator().manual_seed(0))
    for error in (memory.value, stream.value):
        assert isinstance(error, RobustDataError) and expected in str(error)
        assert error.count == 4 and error.total == 4000 and error.indices == [7, 1500, 2500, 3999]
        assert error.by_class == {0: 1, 1: 1, 2: 1, 3: 1}


def test_many_non_finite_samples_list_the_first_few():
    features, inputs, labels, _, num_classes = with_extra_classes([])
    features = features.clone()
    features[1000:1050] = float("nan")
    with pytest.raises(NonFiniteFeaturesError, match=r"in 50 of 4000 samples \(samples per class: 1: 50; first "
                                                     r"sample indices: 1000, 1001, .*, 1009, \.\.\.\)"):
        run_audit(features, inputs, labels, num_classes, generator=torch.Generator().manual_seed(0))


def test_a_model_that_outputs_nan_is_named_as_such():
    images, labels, model = constant_image_set()
    with torch.no_grad():
        model.fc1[1].weight[0, 0] = float("nan")
    features = extract_features(model, images, "penultimate")
    message = "features are NaN or inf for all 600 samples: the model outputs NaN or inf"
    with pytest.raises(NonFiniteFeaturesError, match=message):
        run_audit(features, images.flatten(1).float() / 255, labels, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(NonFiniteFeaturesError, match=message):
        stream_audit(model, TensorBatches(images, labels, 64), 4, generator=torch.Generator().manual_seed(0))


def test_the_audit_task_names_the_model_the_data_and_the_keys():
    from robustdata.audit.results import non_finite_features_error

    error = NonFiniteFeaturesError(2, 5, {0: 1, 3: 1}, [1, 4])
    converted = non_finite_features_error(error, model="models/suspect", data="data/poisoned/train",
                                          layer="penultimate", keys=["a", "b", "c", "d", "e"])
    assert isinstance(converted, DataError)
    text = str(converted)
    assert text.startswith("data/poisoned/train: model models/suspect (layer penultimate) gives NaN or inf")
    assert "first keys: b, e" in text and "in 2 of 5 samples" in text


def test_no_non_finite_score_reaches_the_scores_table():
    import pyarrow as pa

    from robustdata.data.memory import InMemoryDataset
    from robustdata.audit.results import scores_table

    labels = torch.tensor([0, 0, 1])
    data = InMemoryDataset(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), labels, ["a", "b", "c"], ["x", "y"])
    manifest = pa.table({"is_poison": [False, False, None], "source_label": [None, None, None]})
    result = AuditResult({"filter": torch.tensor([0.0, float("nan"), 1.0], dtype=torch.float64)},
                         {"filter": torch.zeros(3, dtype=torch.bool)}, [], "filter", None, None)
    with pytest.raises(RuntimeError, match=r"filter scores are not finite for 1 samples \(first rows \[1\]\)"):
        scores_table(data, manifest, result)
    result.scores["filter"][1] = 0.5
    assert scores_table(data, manifest, result).num_rows == 3


# --------------------------------------------------------------------------------------- numerical failures

def nan_for_class(function, label_count: int):
    """Wrap a per-class scorer so its `label_count`-th call (0-based) returns NaN scores."""
    calls = []

    def wrapped(*args, **kwargs):
        out = function(*args, **kwargs)
        calls.append(None)
        if len(calls) - 1 != label_count:
            return out
        if isinstance(out, tuple):
            return (torch.full_like(out[0], float("nan")), *out[1:])
        return torch.full_like(out, float("nan"))
    return wrapped


def test_a_method_that_returns_nan_marks_the_class_and_writes_no_nan(monkeypatch):
    features, inputs, labels, is_poison, num_classes = with_extra_classes([])
    monkeypatch.setattr(filter_method, "oriented_scores", nan_for_class(filter_method.oriented_scores, 2))
    monkeypatch.setattr(spectre_method, "spectre_scores", nan_for_class(spectre_method.spectre_scores, 0))
    result = run_audit(features, inputs, labels, num_classes, eps=0.1, generator=torch.Generator().manual_seed(0))
    statuses = [c["status"] for c in result.classes]
    assert statuses == ["numerical_failure (spectre not finite)", STATUS_OK,
                        "numerical_failure (filter not finite)", STATUS_OK]
    for scores in result.scores.values():
        assert torch.isfinite(scores).all()
    # class 2 is unscored by every method; class 0 only by SPECTRE, the others stand
    assert not any(result.scores[m][labels == 2].any() for m in METHODS)
    assert not result.scores["spectre"][labels == 0].any() and result.scores["spectral"][labels == 0].any()
    assert not result.flagged["spectre"][labels == 0].any()
    assert result.classes[POISON_CLASS]["poisoned"] and confusion(result.removed, is_poison)["tpr"] == 1.0


# ------------------------------------------------------------------------------------------------- report

def test_the_report_shows_each_class_status():
    g = torch.Generator().manual_seed(3)
    extra = [torch.zeros(0, 64), torch.randn(1, 64, generator=g), constant_blocks()["identical"]]
    features, inputs, labels, _, num_classes = with_extra_classes(extra)
    result = run_audit(features, inputs, labels, num_classes, generator=torch.Generator().manual_seed(0))
    names = ["airplane", "cat", "dog", "frog", "empty_one", "single", "flat"]
    summary = {"removal_method": "filter", "layer": "penultimate", "mode": "auto", "eps": None,
               "num_samples": len(labels), "num_flagged": int(result.removed.sum()), "ground_truth": False,
               "classes": [{**c, "name": names[c["label"]]} for c in result.classes],
               "methods": {m: {"flagged": int(f.sum()), "metrics": None} for m, f in result.flagged.items()}}
    markdown = audit_markdown(summary)
    assert ("Classes not audited normally: empty_one (empty), single (too_few_samples (n=1, need 96)), "
            "flat (constant_features).") in markdown
    header = next(line for line in markdown.splitlines() if line.startswith("| class |"))
    assert header.endswith("| verdict | status |")
    assert any(line.startswith("| flat | 6 | 200 |") and line.endswith("| inconclusive | constant_features |")
               for line in markdown.splitlines())
    assert any(line.startswith("| empty_one | 4 | 0 |") and line.endswith("| clean | empty |")
               for line in markdown.splitlines())
    assert any(line.startswith("| cat | 1 |") and line.endswith("| poisoned | ok |") for line in markdown.splitlines())
